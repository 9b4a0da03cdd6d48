"""The one module of certbot-batch that touches certbot's and acme's internals.

certbot has no public hook for taking over ``certbot renew``; we wrap a handful of its
internal functions instead. Every internal we touch is listed in :data:`BOUNDARY`, one entry
each (module, attribute, why); the table drives both the version gate and the patching:

* at import of our plugins (every certbot command) :func:`install` checks the certbot
  version and that every entry exists with a compatible signature, then wraps the
  *permanent* entries: ``handle_renewal_request`` (decides whether a renewal session owns
  the run), ``log.post_arg_parse_setup`` and ``make_or_verify_needed_dirs`` (certbot's
  locks: ``--batch-skip-if-locked``; then recovery of an interrupted run);
* the *session* entries are wrapped only while a renewal session runs (:func:`activate`)
  and put back exactly as they were when it ends.

On a certbot we have not been tested against, or one whose internals moved, or on any
exception while checking or patching, we print one warning line and leave certbot exactly
as it was: stock behaviour, no traceback, the same exit codes and return values.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import inspect
import logging
import os
import sys
import threading
from typing import Any, Callable, Optional

from certbot_batch import catalog
from certbot_batch.context import RunContext, Scope

logger = logging.getLogger(__name__)

#: certbot majors whose internals this module has been checked against (2.1 .. 5.x).
SUPPORTED_MAJORS = (2, 3, 4, 5)
MIN_VERSION = (2, 1)

BATCH_PLUGINS = catalog.NAMES
#: our plugin name -> the stock plugin whose saved settings it takes over.
STOCK_EQUIVALENT = catalog.STOCK_EQUIVALENT


@dataclasses.dataclass(frozen=True)
class Internal:
    """One certbot/acme internal we rely on."""
    module: str
    #: attribute path below the module ("Class.method"); "a|b": the first that exists
    attr: str
    why: str
    #: "call" (we call it), "wrap-always" (wrapped from install on), "wrap" (wrapped while
    #: a session runs), "read" (we read/construct it)
    use: str = "call"
    #: positional arguments we pass when calling it (checked against its signature)
    args: int = 0
    #: False: optional (only some releases have it; we cope without)
    required: bool = True


_R = "certbot._internal.renewal"
_M = "certbot._internal.main"
_S = "certbot._internal.storage"
_D = "certbot._internal.plugins.disco"
_H = "certbot._internal.hooks"

#: Every certbot and acme internal certbot-batch touches.
BOUNDARY: tuple[Internal, ...] = (
    Internal(_R, "handle_renewal_request", "decide whether a renewal session owns the run",
             "wrap-always", 1),
    Internal("certbot._internal.log", "post_arg_parse_setup", "certbot's first lock (the "
             "logs dir, before make_or_verify_needed_dirs): --batch-skip-if-locked",
             "wrap-always", 1),
    Internal(_M, "make_or_verify_needed_dirs", "after certbot took its lock: finish what an "
             "interrupted run left (challenge files, Apache snippet, pending deployment); "
             "--batch-skip-if-locked for the config and work dirs", "wrap-always", 1),
    Internal(_S, "renewal_conf_files", "inside a session only due lineages reach certbot's "
             "loop", "wrap", 1),
    Internal(_R, "should_renew", "inside a session: the parallel scan's decision", "wrap", 2),
    Internal(_R, "_restore_plugin_configs", "lineages saved with batch-webroot/batch-apache "
             "restore webroot_*/apache_* as for the stock plugins", "wrap", 2),
    Internal(_R, "_renew_describe_results", "print certbot's summary once, after the "
             "deployment, for every wave of the run", "wrap", 5),
    Internal(_M, "renew_cert", "track the lineage certbot's loop renews", "wrap", 3),
    Internal(_D, "PluginsRegistry.find_all", "scan plugin entry points once per run", "wrap",
             0),
    Internal(_D, "PluginsRegistry._load_entry_point", "build fresh plugin entry points from "
             "the cached list", "call", 2),
    Internal("certbot._internal.client", "Client.obtain_certificate", "hand certbot's loop "
             "the certificate validated ahead in the batch", "wrap", 2),
    Internal("certbot._internal.error_handler", "ErrorHandler._set_signal_handlers",
             "worker threads cannot set signal handlers; the session handles stop signals",
             "wrap", 1),
    Internal(_H, "run_saved_post_hooks", "post-hooks once, after the deployment", "wrap", 0),
    Internal(_H, "pre_hook", "pre-hooks before any provisioning or CA contact", "call", 1),
    Internal("certbot.compat.filesystem", "makedirs", "certbot's makedirs changes the "
             "process umask; from worker threads that races: a thread-safe one instead",
             "wrap", 2),
    Internal(_S, "renewal_file_for_certname", "the renewal conf of --cert-name", "call", 2),
    Internal(_S, "lineagename_for_filename", "lineage name of a renewal conf", "call", 1),
    Internal(_R, "reconstitute|_reconstitute", "load a lineage as certbot's loop does",
             "call", 2),
    Internal(_R, "_avoid_invalidating_lineage", "certbot's checks before a renewal", "call", 3),
    Internal(_R, "_avoid_reuse_key_conflicts", "certbot's checks before a renewal", "call", 2,
             required=False),
    Internal(_R, "_update_renewal_params_from_key", "key reuse as certbot's renew_cert",
             "call", 2),
    Internal("certbot._internal.plugins.selection", "choose_configurator_plugins",
             "the lineage's plugins, as certbot's renew_cert chooses them", "call", 3),
    Internal("certbot._internal.cli", "flag_default", "certbot's default server", "call", 1),
    Internal("certbot._internal.cli", "set_by_cli", "was an option given (certbot < 2.3: "
             "config.set_by_user does not exist yet)", "call", 1, required=False),
    Internal("certbot.configuration", "NamespaceConfig.set_by_user", "was an option given "
             "(certbot >= 2.3)", "call", 1, required=False),
    Internal("acme.client", "ClientV2.new_order", "ARI 'replaces' in orders; no new order "
             "after a stop signal", "wrap", 2),
    Internal("acme.messages", "NewOrder.to_partial_json", "ARI 'replaces' in the order "
             "payload", "wrap", 1),
    Internal("acme.client", "ClientV2.finalize_order", "no new certificate is issued after "
             "a stop signal (what was issued is saved); rate-limit answers", "wrap", 2),
    Internal("acme.client", "ClientNetwork._send_request", "pacing towards the CA (token "
             "bucket, CA-wide pause on 503/429, status and Retry-After of each answer)",
             "wrap", 3),
    Internal("acme.client", "ClientNetwork._post_once", "a request answered 503 is sent "
             "again after the CA-wide pause", "wrap", 3),
    Internal("acme.client", "ClientNetwork.get", "a request answered 503 is sent again "
             "after the CA-wide pause", "wrap", 2),
    Internal("certbot._internal.auth_handler", "AuthHandler._report_failed_authzrs",
             "the CA's reason for a failed validation, for the lineage's backoff record",
             "wrap", 2),
    Internal(_M, "_init_le_client", "a lineage renewed from the fallback CA is saved with "
             "its own renewal conf (primary server) by certbot's loop", "wrap", 3),
)

_lock = threading.Lock()
_state: dict[str, Any] = {"installed": False, "disabled_reason": None, "originals": {}}
_current: list[RunContext] = []


class Unavailable(Exception):
    """An internal is missing or changed: the engine stays off."""


def certbot_version() -> str:
    import certbot

    return str(getattr(certbot, "__version__", "0"))


def _version_tuple(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _owner_and_attr(entry: Internal, name: str) -> tuple[Any, str]:
    obj: Any = importlib.import_module(entry.module)
    parts = name.split(".")
    for part in parts[:-1]:
        obj = getattr(obj, part)
    return obj, parts[-1]


def resolve(entry: Internal) -> tuple[Any, str]:
    """(owner object, attribute name) of an entry; raises Unavailable."""
    errors: list[str] = []
    for name in entry.attr.split("|"):
        try:
            owner, attr = _owner_and_attr(entry, name)
        except (ImportError, AttributeError) as exc:
            errors.append(f"{entry.module}.{name}: {exc}")
            continue
        if attr in getattr(owner, "__dict__", {}) or hasattr(owner, attr):
            return owner, attr
        errors.append(f"{entry.module} has no {name}")
    raise Unavailable("; ".join(errors))


def _raw(owner: Any, attr: str) -> Any:
    """The attribute as stored (a classmethod object stays one)."""
    if isinstance(owner, type):
        for klass in owner.__mro__:
            if attr in klass.__dict__:
                return klass.__dict__[attr]
    return getattr(owner, attr)


def _accepts(fn: Any, count: int) -> bool:
    """Does ``fn`` take at least ``count`` positional arguments (besides cls)?"""
    is_cm = isinstance(fn, classmethod)
    target = fn.__func__ if isinstance(fn, (classmethod, staticmethod)) else fn
    if not callable(target):
        return False
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return True  # builtins: nothing to check
    kinds = [p.kind for p in sig.parameters.values()]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return True
    positional = sum(1 for k in kinds if k in (inspect.Parameter.POSITIONAL_ONLY,
                                                inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return positional - (1 if is_cm else 0) >= count


def _check(entry: Internal) -> None:
    owner, attr = resolve(entry)
    value = _raw(owner, attr)
    if entry.use != "read" and not _accepts(value, entry.args):
        raise Unavailable(f"{entry.module}.{entry.attr} no longer takes {entry.args} "
                          "positional argument(s)")


def _available(entry: Internal) -> bool:
    try:
        _check(entry)
    except Unavailable:
        return False
    return True


def disabled_reason() -> Optional[str]:
    """Why the renewal engine is off, or None when it is active."""
    return _state["disabled_reason"]


def is_active() -> bool:
    return bool(_state["installed"]) and _state["disabled_reason"] is None


def install() -> bool:
    """Check this certbot once per process and wrap the permanent entries. Returns True when
    the engine is active. Never raises."""
    with _lock:
        if _state["installed"] or _state["disabled_reason"]:
            return is_active()
        try:
            return _install()
        except Exception as exc:  # noqa: BLE001  (the first law: never break certbot)
            _undo(_state["originals"])
            return _disable(f"could not hook into certbot {certbot_version()} "
                            f"({type(exc).__name__}: {exc})")


def _install() -> bool:
    version = certbot_version()
    numbers = _version_tuple(version)
    if not numbers or numbers[0] not in SUPPORTED_MAJORS or numbers < MIN_VERSION:
        return _disable(f"certbot {version} is not a version certbot-batch supports "
                        f"(2.1 to 5.x)")
    for entry in BOUNDARY:
        try:
            _check(entry)
        except Unavailable as exc:
            if entry.required:
                return _disable(f"certbot {version} changed an internal certbot-batch "
                                f"relies on ({exc})")
    # One of the two ways of asking "was this option given" must be there.
    by_user = [e for e in BOUNDARY if e.attr in ("set_by_cli", "NamespaceConfig.set_by_user")]
    if not any(_available(e) for e in by_user):
        return _disable(f"certbot {version} has neither cli.set_by_cli nor "
                        "NamespaceConfig.set_by_user")
    originals: dict[tuple[str, str], tuple[Any, str, Any]] = _state["originals"]
    for entry in BOUNDARY:
        if entry.use == "wrap-always":
            owner, attr = resolve(entry)
            originals[(entry.module, entry.attr)] = (owner, attr, _saved(owner, attr))
            setattr(owner, attr, _replacement(entry, _raw(owner, attr)))
    _state["installed"] = True
    return True


_INHERITED = object()


def _saved(owner: Any, attr: str) -> Any:
    """What to put back: the raw attribute, or a marker when a class only inherits it (then
    our override is deleted again instead of pinning the base's function on the class)."""
    if isinstance(owner, type) and attr not in owner.__dict__:
        return _INHERITED
    return _raw(owner, attr)


def _undo(originals: dict[tuple[str, str], tuple[Any, str, Any]]) -> None:
    for owner, attr, value in originals.values():
        with contextlib.suppress(Exception):
            if value is _INHERITED:
                delattr(owner, attr)
            else:
                setattr(owner, attr, value)
    originals.clear()


def _disable(reason: str) -> bool:
    _state["disabled_reason"] = reason
    message = (f"certbot-batch: renewal engine disabled: {reason}. certbot runs as stock; "
               "upgrade certbot-batch or use a supported certbot.")
    # Plugins are imported before certbot has set up its logging (and certbot 2.x does not
    # replay early warnings on the terminal), so say it on stderr directly, once.
    with contextlib.suppress(Exception):
        sys.stderr.write(message + "\n")
    logger.info("%s", message)
    return False


def original(module: str, attr: str) -> Any:
    """The unwrapped function of a table entry."""
    saved = _state["originals"].get((module, attr))
    if saved is not None and saved[2] is not _INHERITED:
        return saved[2]
    for entry in BOUNDARY:
        if (entry.module, entry.attr) == (module, attr):
            owner, name = resolve(entry)
            value = _raw(owner, name)
            return value
    raise KeyError((module, attr))


def _orig(module: str, attr: str) -> Callable[..., Any]:
    value = original(module, attr)
    if isinstance(value, classmethod):
        raise TypeError("use the owner for classmethods")
    return value  # type: ignore[no-any-return]


# -- the run context ---------------------------------------------------------------------

def current() -> Optional[RunContext]:
    """The run context of the renewal session in progress, or None."""
    return _current[-1] if _current else None


def activate(ctx: RunContext) -> Scope:
    """Publish ``ctx`` and wrap the session entries of the table (on entering); undone on
    leaving. Entering raises Unavailable (nothing left patched) when that cannot be done."""
    done: dict[tuple[str, str], tuple[Any, str, Any]] = {}

    def enter() -> RunContext:
        if not is_active():
            raise Unavailable(disabled_reason() or "certbot-batch is not installed")
        with _lock:
            try:
                for entry in BOUNDARY:
                    if entry.use != "wrap":
                        continue
                    owner, attr = resolve(entry)
                    raw = _raw(owner, attr)
                    done[(entry.module, entry.attr)] = (owner, attr, _saved(owner, attr))
                    _state["originals"][(entry.module, entry.attr)] = (owner, attr, raw)
                    setattr(owner, attr, _replacement(entry, raw))
            except Exception as exc:
                _undo(done)
                raise Unavailable(f"{type(exc).__name__}: {exc}") from exc
            _current.append(ctx)
        return ctx

    def leave() -> None:
        with _lock:
            if ctx in _current:
                _current.remove(ctx)
            for key in done:
                _state["originals"].pop(key, None)
            _undo(done)

    return Scope(enter, leave)


def lineage_context(name: Optional[str]) -> Scope:
    """Mark the calling thread as working on lineage ``name`` (inside a session)."""
    ctx = current()
    saved: list[Any] = []

    def enter() -> None:
        if ctx is not None:
            saved.append(getattr(ctx.local, "lineage", None))
            ctx.local.lineage = name

    def leave() -> None:
        if ctx is not None and saved:
            ctx.local.lineage = saved.pop()

    return Scope(enter, leave)


def current_lineage() -> Optional[str]:
    ctx = current()
    return ctx.current_lineage() if ctx is not None else None


# -- wrappers ----------------------------------------------------------------------------

def _replacement(entry: Internal, raw: Any) -> Any:
    key = (entry.module, entry.attr)
    factory = _WRAPPERS[key]
    return factory(raw)


def _wrap_handle_renewal_request(orig: Callable[..., Any]) -> Callable[..., Any]:
    def handle_renewal_request(config: Any, *args: Any, **kwargs: Any) -> Any:
        from certbot_batch import session

        def stock(cfg: Any = None) -> Any:
            return orig(config if cfg is None else cfg, *args, **kwargs)

        if args or kwargs:
            return stock()  # a signature we do not know: certbot's own, untouched
        return session.handle_renewal_request(config, stock)
    handle_renewal_request.__wrapped__ = orig  # type: ignore[attr-defined]
    return handle_renewal_request


def _skip_if_locked(config: Any, exc: BaseException) -> None:
    """--batch-skip-if-locked: another certbot run holds one of certbot's locks (an hourly
    timer meeting a long run): one line, exit 0, nothing else, instead of an error mail
    every hour. Returns when the option is not given or ``exc`` is not certbot's
    LockError (the caller re-raises: certbot's own message and exit code)."""
    if getattr(config, "batch_skip_if_locked", False) is not True or \
            type(exc).__name__ != "LockError":
        return
    with contextlib.suppress(Exception):
        sys.stderr.write(f"certbot-batch: {exc} Nothing to do for this run "
                         "(--batch-skip-if-locked).\n")
    raise SystemExit(0) from None


def _wrap_log_setup(orig: Callable[..., Any]) -> Callable[..., Any]:
    def post_arg_parse_setup(config: Any, *args: Any, **kwargs: Any) -> Any:
        # certbot takes its first lock here (logs_dir, through util.set_up_core_dir), before
        # make_or_verify_needed_dirs locks the config and work dirs.
        try:
            return orig(config, *args, **kwargs)
        except Exception as exc:
            _skip_if_locked(config, exc)
            raise
    post_arg_parse_setup.__wrapped__ = orig  # type: ignore[attr-defined]
    return post_arg_parse_setup


def _wrap_make_dirs(orig: Callable[..., Any]) -> Callable[..., Any]:
    def make_or_verify_needed_dirs(config: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            result = orig(config, *args, **kwargs)
        except Exception as exc:
            _skip_if_locked(config, exc)
            raise
        try:
            from certbot_batch import recovery

            recovery.on_certbot_start(config)
        except Exception:  # noqa: BLE001  (recovery must never break a certbot command)
            logger.warning("certbot-batch: recovery of an interrupted run failed; the next "
                           "run tries again", exc_info=True)
        return result
    make_or_verify_needed_dirs.__wrapped__ = orig  # type: ignore[attr-defined]
    return make_or_verify_needed_dirs


def _wrap_conf_files(orig: Callable[..., Any]) -> Callable[..., Any]:
    def renewal_conf_files(config: Any, *args: Any, **kwargs: Any) -> Any:
        ctx = current()
        if ctx is not None and ctx.conf_files is not None:
            return list(ctx.conf_files)
        return orig(config, *args, **kwargs)
    return renewal_conf_files


def _wrap_should_renew(orig: Callable[..., Any]) -> Callable[..., Any]:
    def should_renew(config: Any, lineage: Any, *args: Any, **kwargs: Any) -> Any:
        ctx = current()
        if ctx is not None and ctx.should_renew is not None:
            verdict = ctx.should_renew(config, lineage)
            if verdict is not None:
                return bool(verdict)
        return orig(config, lineage, *args, **kwargs)
    return should_renew


def _wrap_restore(orig: Callable[..., Any]) -> Callable[..., Any]:
    def _restore_plugin_configs(config: Any, renewalparams: Any, *args: Any,
                                **kwargs: Any) -> Any:
        result = orig(config, renewalparams, *args, **kwargs)
        # A lineage saved with a batch plugin keeps the settings of the stock plugin it
        # replaces (webroot_map / webroot_path, apache_*): restore them exactly as certbot
        # would have for the stock plugin.
        swapped = dict(renewalparams)
        changed = False
        for key in ("authenticator", "installer"):
            value = swapped.get(key)
            if value in STOCK_EQUIVALENT:
                swapped[key] = STOCK_EQUIVALENT[value]
                changed = True
        if changed:
            orig(config, swapped, *args, **kwargs)
        return result
    return _restore_plugin_configs


def _wrap_describe(orig: Callable[..., Any]) -> Callable[..., Any]:
    def _renew_describe_results(config: Any, *lists: Any, **kwargs: Any) -> Any:
        ctx = current()
        if ctx is not None and ctx.hold_back_summary and len(lists) == 4 and not kwargs:
            ctx.summaries.append(tuple(list(x) for x in lists))  # type: ignore[arg-type]
            return None
        return orig(config, *lists, **kwargs)
    return _renew_describe_results


def describe_results(config: Any, successes: list[str], failures: list[str],
                     skipped: list[str], parse_failures: list[str]) -> None:
    """certbot's own end-of-run summary."""
    _orig(_R, "_renew_describe_results")(config, successes, failures, skipped,
                                          parse_failures)


def _wrap_renew_cert(orig: Callable[..., Any]) -> Callable[..., Any]:
    def renew_cert(config: Any, plugins: Any, lineage: Any, *args: Any, **kwargs: Any) -> Any:
        ctx = current()
        if ctx is None or ctx.renew_cert is None:
            return orig(config, plugins, lineage, *args, **kwargs)
        result: list[Any] = []

        def proceed() -> None:
            result.append(orig(config, plugins, lineage, *args, **kwargs))

        with lineage_context(lineage.lineagename):
            ctx.renew_cert(config, lineage, proceed)
        return result[0] if result else None
    return renew_cert


def _wrap_find_all(raw: Any) -> Any:
    orig_cm = raw  # a classmethod object

    def find_all(cls: Any) -> Any:
        """Plugin discovery once per session: certbot rescans every distribution's entry
        points for every lineage. The entry-point list is kept, but fresh PluginEntryPoint
        objects are built each call, because certbot caches the initialised plugin on them
        and each lineage needs a plugin built from its own config."""
        fn = orig_cm.__get__(None, cls)
        ctx = current()
        if ctx is None:
            return fn()
        with ctx.lock:
            eps = ctx.plugin_entry_points
        if eps is None:
            registry = fn()
            with ctx.lock:
                ctx.plugin_entry_points = [ep.entry_point for ep in registry.values()]
            return registry
        plugins: dict[str, Any] = {}
        for ep in eps:
            _load_entry_point(cls, ep, plugins)
        return cls(plugins)
    return classmethod(find_all)


def _load_entry_point(cls: Any, ep: Any, plugins: dict[str, Any]) -> None:
    loader = cls._load_entry_point
    try:
        loader(ep, plugins)
    except TypeError:
        loader(ep, plugins, False)  # certbot 1.x/2.x: (entry_point, plugins, with_prefix)


def _wrap_obtain(orig: Callable[..., Any]) -> Callable[..., Any]:
    def obtain_certificate(self: Any, sans: Any, *args: Any, **kwargs: Any) -> Any:
        ctx = current()
        name = ctx.current_lineage() if ctx is not None else None
        if ctx is not None and name is not None:
            with ctx.lock:
                found = name in ctx.prefetched
                result = ctx.prefetched.pop(name, None)
            if found:
                if isinstance(result, BaseException):
                    raise result  # validated ahead and failed: no second attempt at the CA
                return result
        return orig(self, sans, *args, **kwargs)
    return obtain_certificate


def _wrap_signal_handlers(orig: Callable[..., Any]) -> Callable[..., Any]:
    def _set_signal_handlers(self: Any, *args: Any, **kwargs: Any) -> Any:
        # Worker threads cannot install signal handlers (Python allows it in the main
        # thread only), and inside a session the main thread's stop handler must stay in
        # place: it finishes the run (saves what was issued) instead of dying mid-save.
        if current() is not None:
            return None
        return orig(self, *args, **kwargs)
    return _set_signal_handlers


def _wrap_post_hooks(orig: Callable[..., Any]) -> Callable[..., Any]:
    def run_saved_post_hooks(*args: Any, **kwargs: Any) -> Any:
        ctx = current()
        if ctx is not None and ctx.hold_back_summary:
            ctx.post_hook_calls.append((args, kwargs))
            return None
        return orig(*args, **kwargs)
    return run_saved_post_hooks


def run_post_hooks(*args: Any, **kwargs: Any) -> Any:
    return _orig(_H, "run_saved_post_hooks")(*args, **kwargs)


def _wrap_makedirs(orig: Callable[..., Any]) -> Callable[..., Any]:
    def makedirs(file_path: str, mode: int = 0o777, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or os.name != "posix":
            return orig(file_path, mode, *args, **kwargs)
        # certbot's version sets the process umask to (umask | ~mode) around os.makedirs;
        # two threads doing that at once can leave the umask at 0077 (or 0) for the rest of
        # the process. os.mkdir(path, mode) of every missing level gives the same modes
        # (mode & ~umask) without touching the umask.
        return _makedirs_no_umask(file_path, mode)
    return makedirs


def _makedirs_no_umask(path: str, mode: int) -> None:
    from certbot_batch.paths import missing_dirs

    path = os.path.abspath(path)
    missing = missing_dirs(path)
    if not missing:
        raise FileExistsError(17, "File exists", path)  # as os.makedirs(exist_ok=False)
    for directory in missing:
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            if directory == path or not os.path.isdir(directory):
                raise


def _wrap_new_order(orig: Callable[..., Any]) -> Callable[..., Any]:
    from certbot_batch.challenges import replaces

    return replaces.wrap_new_order(orig, current)


def _wrap_to_partial_json(orig: Callable[..., Any]) -> Callable[..., Any]:
    from certbot_batch.challenges import replaces

    return replaces.wrap_to_partial_json(orig)


def _wrap_finalize(orig: Callable[..., Any]) -> Callable[..., Any]:
    from certbot_batch.challenges import replaces

    def finalize_order(self: Any, orderr: Any, *args: Any, **kwargs: Any) -> Any:
        ctx = current()
        if ctx is not None and ctx.stopping.is_set():
            raise replaces.Stopped("certbot-batch: the run is stopping (signal); the order "
                                   "was not finalized")
        if ctx is not None and ctx.pacer is not None:
            return ctx.pacer.finalize(orig, self, ctx.current_lineage(), orderr, *args,
                                      **kwargs)
        return orig(self, orderr, *args, **kwargs)
    return finalize_order


def _wrap_send_request(orig: Callable[..., Any]) -> Callable[..., Any]:
    def _send_request(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        ctx = current()
        if ctx is not None and ctx.pacer is not None:
            return ctx.pacer.send(orig, self, method, url, *args, **kwargs)
        return orig(self, method, url, *args, **kwargs)
    return _send_request


def _wrap_retrying(orig: Callable[..., Any]) -> Callable[..., Any]:
    def retrying(self: Any, *args: Any, **kwargs: Any) -> Any:
        ctx = current()
        if ctx is not None and ctx.pacer is not None:
            return ctx.pacer.retrying(orig, ctx.stopping.is_set, self, *args, **kwargs)
        return orig(self, *args, **kwargs)
    return retrying


def _wrap_report_failed(orig: Callable[..., Any]) -> Callable[..., Any]:
    def _report_failed_authzrs(self: Any, failed_authzrs: Any, *args: Any,
                               **kwargs: Any) -> Any:
        ctx = current()
        name = ctx.current_lineage() if ctx is not None else None
        if ctx is not None and name:
            problems = []
            with contextlib.suppress(Exception):
                for authzr in failed_authzrs:
                    ident = getattr(authzr.body.identifier, "value", authzr.body.identifier)
                    for challb in authzr.body.challenges:
                        if challb.error:
                            problems.append(f"{ident}: {challb.error.typ.split(':')[-1]}: "
                                            f"{challb.error.detail}")
            with ctx.lock:
                ctx.failure_detail[name] = "; ".join(problems)
        return orig(self, failed_authzrs, *args, **kwargs)
    return _report_failed_authzrs


def _wrap_init_le_client(orig: Callable[..., Any]) -> Callable[..., Any]:
    def _init_le_client(config: Any, authenticator: Any, installer: Any, *args: Any,
                        **kwargs: Any) -> Any:
        ctx = current()
        name = ctx.current_lineage() if ctx is not None else None
        fallback = ctx.fallback.get(name) if ctx is not None and name else None
        if fallback is not None:
            # Renewed from the fallback CA: its client talks to that CA, while certbot's
            # loop saves the lineage with the lineage's own config (its server stays the
            # primary one, so the next renewal goes back there).
            config = copy.deepcopy(config)  # NamespaceConfig: a shallow copy shares values
            config.server = fallback
            config.account = None
        return orig(config, authenticator, installer, *args, **kwargs)
    return _init_le_client


_WRAPPERS: dict[tuple[str, str], Callable[[Any], Any]] = {
    (_R, "handle_renewal_request"): _wrap_handle_renewal_request,
    ("certbot._internal.log", "post_arg_parse_setup"): _wrap_log_setup,
    (_M, "make_or_verify_needed_dirs"): _wrap_make_dirs,
    (_S, "renewal_conf_files"): _wrap_conf_files,
    (_R, "should_renew"): _wrap_should_renew,
    (_R, "_restore_plugin_configs"): _wrap_restore,
    (_R, "_renew_describe_results"): _wrap_describe,
    (_M, "renew_cert"): _wrap_renew_cert,
    (_D, "PluginsRegistry.find_all"): _wrap_find_all,
    ("certbot._internal.client", "Client.obtain_certificate"): _wrap_obtain,
    ("certbot._internal.error_handler", "ErrorHandler._set_signal_handlers"):
        _wrap_signal_handlers,
    (_H, "run_saved_post_hooks"): _wrap_post_hooks,
    ("certbot.compat.filesystem", "makedirs"): _wrap_makedirs,
    ("acme.client", "ClientV2.new_order"): _wrap_new_order,
    ("acme.messages", "NewOrder.to_partial_json"): _wrap_to_partial_json,
    ("acme.client", "ClientV2.finalize_order"): _wrap_finalize,
    ("acme.client", "ClientNetwork._send_request"): _wrap_send_request,
    ("acme.client", "ClientNetwork._post_once"): _wrap_retrying,
    ("acme.client", "ClientNetwork.get"): _wrap_retrying,
    ("certbot._internal.auth_handler", "AuthHandler._report_failed_authzrs"):
        _wrap_report_failed,
    (_M, "_init_le_client"): _wrap_init_le_client,
}

# Every wrapped entry has a wrapper, and nothing else is wrapped.
assert {(e.module, e.attr) for e in BOUNDARY if e.use.startswith("wrap")} == set(_WRAPPERS)


# -- calls into certbot, for the session -------------------------------------------------

def _call(module: str, attr: str, *args: Any) -> Any:
    for entry in BOUNDARY:
        if entry.module == module and entry.attr == attr:
            owner, name = resolve(entry)
            return getattr(owner, name)(*args)
    raise KeyError((module, attr))


def renewal_conf_files(config: Any) -> list[str]:
    """All renewal confs, bypassing any session override."""
    return list(_orig(_S, "renewal_conf_files")(config))


def renewal_file_for_certname(config: Any, certname: str) -> str:
    return str(_call(_S, "renewal_file_for_certname", config, certname))


def lineage_name_for_file(path: str) -> str:
    return str(_call(_S, "lineagename_for_filename", path))


def reconstitute(config: Any, conf_file: str) -> Any:
    return _call(_R, "reconstitute|_reconstitute", config, conf_file)


def notify(message: str) -> None:
    from certbot.display import util as display_util

    display_util.notify(message)


def set_by_user(config: Any, name: str) -> bool:
    fn = getattr(type(config), "set_by_user", None)
    if fn is not None:
        return bool(config.set_by_user(name))
    return bool(_call("certbot._internal.cli", "set_by_cli", name))


def default_of(name: str) -> Any:
    return _call("certbot._internal.cli", "flag_default", name)


def run_pre_hook(config: Any) -> None:
    """certbot's pre-hook step (each distinct command once per process)."""
    _call(_H, "pre_hook", config)


def lineage_sans(lineage: Any) -> list[Any]:
    if hasattr(lineage, "sans"):
        return list(lineage.sans())
    return list(lineage.names())


def find_plugins() -> Any:
    owner, attr = resolve(next(e for e in BOUNDARY if e.attr == "PluginsRegistry.find_all"))
    return getattr(owner, attr)()


def prepare_obtain(config: Any, lineage: Any, plugins: Any) -> Callable[[], Any]:
    """certbot's renew_cert up to (not including) obtaining the certificate: the same
    checks, key reuse, plugin choice and ACME client, so the certificate we obtain ahead of
    certbot's loop honours every setting of the lineage. Returns the obtain callable."""
    lineage.ensure_deployed()
    original_server = lineage.configuration["renewalparams"].get(
        "server", default_of("server"))
    _call(_R, "_avoid_invalidating_lineage", config, lineage, original_server)
    try:
        avoid_conflicts = resolve(next(e for e in BOUNDARY
                                       if e.attr == "_avoid_reuse_key_conflicts"))
    except Unavailable:
        avoid_conflicts = None
    if avoid_conflicts is not None:
        getattr(*avoid_conflicts)(config, lineage)
    sans = lineage_sans(lineage)
    new_key = None
    if config.reuse_key and not getattr(config, "new_key", False):
        new_key = os.path.normpath(lineage.privkey)
        _call(_R, "_update_renewal_params_from_key", new_key, config)
    installer, auth = _call("certbot._internal.plugins.selection",
                            "choose_configurator_plugins", config, plugins, "certonly")
    ctx = current()
    if ctx is not None and ctx.wrap_authenticator is not None and auth is not None:
        # e.g. a DNS plugin whose perform() joins the wave's grouped perform
        auth = ctx.wrap_authenticator(auth, config)
    le_client = _call(_M, "_init_le_client", config, auth, installer)
    obtain = _orig("certbot._internal.client", "Client.obtain_certificate")
    return lambda: obtain(le_client, sans, new_key)


class _ObservedEnv(dict):  # type: ignore[type-arg]
    """certbot's manual plugin's ``env`` dict, calling back as each entry is set."""

    def __init__(self, initial: dict[Any, Any],
                 callback: Callable[[Any, dict[str, str]], None]) -> None:
        super().__init__(initial)
        self._callback = callback

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        if isinstance(value, dict):
            self._callback(key, {str(k): str(v) for k, v in value.items()})


def observe_manual_env(auth: Any, callback: Callable[[Any, dict[str, str]], None]) -> bool:
    """certbot's manual plugin keeps, per challenge, the variables its auth hook ran with
    plus the hook's output (``self.env[achall]``, ``CERTBOT_AUTH_OUTPUT`` included; the same
    in certbot 2.1 to 5.x) for the cleanup hook. Call ``callback(achall, env)`` each time an
    entry is set, i.e. right after that challenge's auth hook returned. False (nothing
    observed) when the plugin keeps no such dict."""
    env = getattr(auth, "env", None)
    if type(env) is not dict:
        return False
    auth.env = _ObservedEnv(env, callback)
    return True
