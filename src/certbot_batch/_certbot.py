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

The seam carries no policy: its wrappers forward to typed hooks, :class:`ProcessHooks`
(handed over by ``engine.py`` at install) and :class:`SessionHooks` (the renewal session,
found through the current run of the run model). Nothing here imports the modules that
implement them, so nothing below the session imports upward.

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
from typing import Any, Callable, Optional, Protocol

from certbot_batch import catalog, paths, run
from certbot_batch.run import Run, Scope

logger = logging.getLogger(__name__)

#: certbot majors whose internals this module has been checked against (2.1 .. 5.x).
SUPPORTED_MAJORS = (2, 3, 4, 5)
MIN_VERSION = (2, 1)



class ProcessHooks(Protocol):
    """What the seam asks of certbot-batch for every certbot command (engine.py)."""

    def handle_renewal_request(self, config: Any, stock: Callable[[], Any]) -> Any:
        """certbot's handle_renewal_request: a renewal session, or ``stock()``."""

    def dirs_ready(self, config: Any) -> None:
        """certbot took its locks: finish what an interrupted run left (recovery)."""

    def lock_refused(self, config: Any, exc: BaseException) -> bool:
        """Another certbot holds a lock certbot wanted: True to end this run quietly
        (exit 0, one line already said), False for certbot's own error."""


class SessionHooks(Protocol):
    """What the seam's session wrappers forward to (the renewal session implements it)."""

    def should_renew(self, config: Any, lineage: Any) -> Optional[bool]:
        """The scan's decision, or None to let certbot decide."""

    def renew_cert(self, config: Any, lineage: Any, proceed: Callable[[], None]) -> None:
        """Around certbot's renew_cert of one lineage (``proceed`` runs certbot's)."""

    def obtained(self, name: str) -> tuple[bool, Any]:
        """(found, result) of what was obtained ahead for lineage ``name``."""

    def plugin_substitutes(self) -> dict[str, str]:
        """stock plugin name -> the plugin (by name) that stands in for it in this run."""

    def authenticator(self, auth: Any, config: Any) -> Any:
        """The authenticator a lineage's issuance ahead of the loop uses (e.g. one whose
        perform() joins the wave's DNS group)."""

    def client_config(self, config: Any) -> Any:
        """The config certbot's ACME client of the calling thread's lineage is built
        from (the fallback CA's, when it is renewed from there)."""

    def new_order(self, send: Callable[..., Any], client: Any, csr_pem: bytes,
                  *args: Any, **kwargs: Any) -> Any:
        """acme's new_order: ``send(client, csr_pem, ...)`` sends it."""

    def replaces(self) -> Optional[str]:
        """The certID the calling thread's NewOrder payload names in ``replaces``."""

    def finalize(self, orig: Callable[..., Any], client: Any, orderr: Any,
                 *args: Any, **kwargs: Any) -> Any:
        """acme's finalize_order."""

    def send_request(self, orig: Callable[..., Any], net: Any, method: str, url: str,
                     *args: Any, **kwargs: Any) -> Any:
        """acme's ClientNetwork._send_request (every ACME request)."""

    def retrying(self, orig: Callable[..., Any], net: Any, *args: Any,
                 **kwargs: Any) -> Any:
        """acme's ClientNetwork._post_once / get (one ACME request, to retry after a
        pause)."""

    def failed_authorizations(self, problems: list[str]) -> None:
        """The CA's reasons for the calling thread's failed validations."""


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
_DNS = "certbot.plugins.dns_common"

#: Every certbot and acme internal certbot-batch touches.
BOUNDARY: tuple[Internal, ...] = (
    Internal(_R, "handle_renewal_request", "decide whether a renewal session owns the run",
             "wrap-always", 1),
    Internal("certbot._internal.log", "post_arg_parse_setup", "certbot's first lock (the "
             "logs dir, before make_or_verify_needed_dirs): --batch-skip-if-locked",
             "wrap-always", 1),
    Internal(_M, "make_or_verify_needed_dirs", "after certbot took its lock: finish what an "
             "interrupted run left (challenge files, server snippets, pending deployment); "
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
    Internal(_D, "PluginEntryPoint.__init__", "inside a session a stock plugin's entry "
             "builds its batch counterpart (the entry's plugin_cls it sets)", "read"),
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
    Internal("acme.client", "ClientV2.get_directory", "inside a session each CA's "
             "directory is fetched once per run (certbot builds a client per lineage)",
             "wrap", 2),
    Internal(_M, "_determine_account", "inside a session the account is loaded once per "
             "run (certbot loads and parses its key for every lineage)", "wrap", 1),
    Internal(_DNS, "DNSAuthenticator._perform", "dns-01 groups follow each record through "
             "the plugin's own per-record method (created?)", "call", 4),
    Internal(_DNS, "DNSAuthenticator._cleanup", "dns-01 groups follow each record through "
             "the plugin's own per-record method (removed?); recovery removes records",
             "call", 4),
    Internal(_DNS, "DNSAuthenticator._setup_credentials", "recovery builds a DNS plugin "
             "from a renewal conf and journaled settings", "call", 1),
    Internal("certbot._internal.plugins.manual", "Authenticator.cleanup", "the manual "
             "plugin's env dict (the auth hook's variables and output, per challenge) is "
             "journaled for the cleanup hook of a recovery", "read", required=False),
    Internal("acme.client", "ClientNetwork.__init__", "the pacer keys account-wide rate "
             "limits by the account URI ClientNetwork keeps (.account)", "read",
             required=False),
)



@dataclasses.dataclass
class SeamState:
    """What the seam patched (to put it back), whether it is on, and why not."""
    installed: bool = False
    disabled_reason: Optional[str] = None
    #: (module, attr) -> (owner, attribute name, what to put back)
    originals: dict[tuple[str, str], tuple[Any, str, Any]] = \
        dataclasses.field(default_factory=dict)
    hooks: Optional[ProcessHooks] = None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


def _seam() -> SeamState:
    with run.PROCESS.lock:
        if run.PROCESS.seam is None:
            run.PROCESS.seam = SeamState()
        return run.PROCESS.seam


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
    return _seam().disabled_reason


def is_active() -> bool:
    state = _seam()
    return state.installed and state.disabled_reason is None


def install(hooks: ProcessHooks) -> bool:
    """Check this certbot once per process and wrap the permanent entries, forwarding to
    ``hooks``. Returns True when the engine is active. Never raises."""
    state = _seam()
    with state.lock:
        if state.installed or state.disabled_reason:
            return is_active()
        state.hooks = hooks
        try:
            return _install(state)
        except Exception as exc:  # noqa: BLE001  (the first law: never break certbot)
            _undo(state.originals)
            return _disable(f"could not hook into certbot {certbot_version()} "
                            f"({type(exc).__name__}: {exc})")


def _install(state: SeamState) -> bool:
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
    for entry in BOUNDARY:
        if entry.use == "wrap-always":
            owner, attr = resolve(entry)
            state.originals[(entry.module, entry.attr)] = (owner, attr, _saved(owner, attr))
            setattr(owner, attr, _replacement(entry, _raw(owner, attr)))
    state.installed = True
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
    _seam().disabled_reason = reason
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
    saved = _seam().originals.get((module, attr))
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


# -- the session's patches -----------------------------------------------------------------

def activate(session: Run) -> Scope:
    """Publish ``session`` as the current run and wrap the session entries of the table (on
    entering); undone on leaving. Entering raises Unavailable (nothing left patched) when
    that cannot be done."""
    done: dict[tuple[str, str], tuple[Any, str, Any]] = {}
    published = run.publish(session)
    state = _seam()

    def enter() -> Run:
        if not is_active():
            raise Unavailable(disabled_reason() or "certbot-batch is not installed")
        with state.lock:
            try:
                for entry in BOUNDARY:
                    if entry.use != "wrap":
                        continue
                    owner, attr = resolve(entry)
                    raw = _raw(owner, attr)
                    done[(entry.module, entry.attr)] = (owner, attr, _saved(owner, attr))
                    state.originals[(entry.module, entry.attr)] = (owner, attr, raw)
                    setattr(owner, attr, _replacement(entry, raw))
            except Exception as exc:
                _undo(done)
                raise Unavailable(f"{type(exc).__name__}: {exc}") from exc
            published.__enter__()
        return session

    def leave() -> None:
        with state.lock:
            published.__exit__(None, None, None)
            for key in done:
                state.originals.pop(key, None)
            _undo(done)

    return Scope(enter, leave)


def _hooks() -> Optional[SessionHooks]:
    current = run.current()
    return current.hooks if current is not None else None


# -- wrappers: no policy, only forwarding -------------------------------------------------

def _replacement(entry: Internal, raw: Any) -> Any:
    key = (entry.module, entry.attr)
    factory = _WRAPPERS[key]
    return factory(raw)


def _process_hooks() -> Optional[ProcessHooks]:
    return _seam().hooks


def _wrap_handle_renewal_request(orig: Callable[..., Any]) -> Callable[..., Any]:
    def handle_renewal_request(config: Any, *args: Any, **kwargs: Any) -> Any:
        def stock(cfg: Any = None) -> Any:
            return orig(config if cfg is None else cfg, *args, **kwargs)

        hooks = _process_hooks()
        if args or kwargs or hooks is None:
            return stock()  # a signature we do not know: certbot's own, untouched
        return hooks.handle_renewal_request(config, stock)
    handle_renewal_request.__wrapped__ = orig  # type: ignore[attr-defined]
    return handle_renewal_request


def _lock_refused(config: Any, exc: BaseException) -> None:
    """certbot could not take one of its locks: the process hooks may end the run quietly
    (--batch-skip-if-locked); otherwise the caller re-raises (certbot's own error)."""
    hooks = _process_hooks()
    if hooks is not None and type(exc).__name__ == "LockError" and \
            hooks.lock_refused(config, exc):
        raise SystemExit(0) from None


def _wrap_log_setup(orig: Callable[..., Any]) -> Callable[..., Any]:
    def post_arg_parse_setup(config: Any, *args: Any, **kwargs: Any) -> Any:
        # certbot takes its first lock here (logs_dir, through util.set_up_core_dir), before
        # make_or_verify_needed_dirs locks the config and work dirs.
        try:
            return orig(config, *args, **kwargs)
        except Exception as exc:
            _lock_refused(config, exc)
            raise
    post_arg_parse_setup.__wrapped__ = orig  # type: ignore[attr-defined]
    return post_arg_parse_setup


def _wrap_make_dirs(orig: Callable[..., Any]) -> Callable[..., Any]:
    def make_or_verify_needed_dirs(config: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            result = orig(config, *args, **kwargs)
        except Exception as exc:
            _lock_refused(config, exc)
            raise
        hooks = _process_hooks()
        if hooks is not None:
            try:
                hooks.dirs_ready(config)
            except Exception:  # noqa: BLE001  (recovery must never break a certbot command)
                logger.warning("certbot-batch: recovery of an interrupted run failed; the "
                               "next run tries again", exc_info=True)
        return result
    make_or_verify_needed_dirs.__wrapped__ = orig  # type: ignore[attr-defined]
    return make_or_verify_needed_dirs


def _wrap_conf_files(orig: Callable[..., Any]) -> Callable[..., Any]:
    def renewal_conf_files(config: Any, *args: Any, **kwargs: Any) -> Any:
        current = run.current()
        if current is not None and current.conf_files is not None:
            return list(current.conf_files)
        return orig(config, *args, **kwargs)
    return renewal_conf_files


def _wrap_should_renew(orig: Callable[..., Any]) -> Callable[..., Any]:
    def should_renew(config: Any, lineage: Any, *args: Any, **kwargs: Any) -> Any:
        hooks = _hooks()
        if hooks is not None:
            verdict = hooks.should_renew(config, lineage)
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
            if value in catalog.STOCK_EQUIVALENT:
                swapped[key] = catalog.STOCK_EQUIVALENT[value]
                changed = True
        if changed:
            orig(config, swapped, *args, **kwargs)
        return result
    return _restore_plugin_configs


def _wrap_describe(orig: Callable[..., Any]) -> Callable[..., Any]:
    def _renew_describe_results(config: Any, *lists: Any, **kwargs: Any) -> Any:
        current = run.current()
        if current is not None and current.hold_back_summary and len(lists) == 4 \
                and not kwargs:
            ok, failed, skipped, parse = (list(x) for x in lists)
            current.summaries.append((ok, failed, skipped, parse))
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
        current = run.current()
        if current is None:
            return orig(config, plugins, lineage, *args, **kwargs)
        result: list[Any] = []

        def proceed() -> None:
            result.append(orig(config, plugins, lineage, *args, **kwargs))

        with current.lineage_scope(lineage.lineagename):
            current.hooks.renew_cert(config, lineage, proceed)
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
        current = run.current()
        if current is None:
            return fn()
        with current.lock:
            eps = current.plugin_entry_points
        if eps is None:
            registry = fn()
            with current.lock:
                current.plugin_entry_points = [ep.entry_point for ep in registry.values()]
        else:
            plugins: dict[str, Any] = {}
            for ep in eps:
                _load_entry_point(cls, ep, plugins)
            registry = cls(plugins)
        _substitute(registry, current.hooks.plugin_substitutes())
        return registry
    return classmethod(find_all)


def _substitute(registry: Any, substitutes: dict[str, str]) -> None:
    """A stock plugin's entry builds its stand-in's class (same name, same options): the
    registry's entries are fresh for each call, so nothing outlives the session."""
    for stock, stand_in in substitutes.items():
        if stock in registry and stand_in in registry:
            registry[stock].plugin_cls = registry[stand_in].plugin_cls


def _load_entry_point(cls: Any, ep: Any, plugins: dict[str, Any]) -> None:
    loader = cls._load_entry_point
    try:
        loader(ep, plugins)
    except TypeError:
        loader(ep, plugins, False)  # certbot 1.x/2.x: (entry_point, plugins, with_prefix)


def _wrap_obtain(orig: Callable[..., Any]) -> Callable[..., Any]:
    def obtain_certificate(self: Any, sans: Any, *args: Any, **kwargs: Any) -> Any:
        current = run.current()
        name = current.current_lineage() if current is not None else None
        if current is not None and name is not None:
            found, result = current.hooks.obtained(name)
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
        if run.current() is not None:
            return None
        return orig(self, *args, **kwargs)
    return _set_signal_handlers


def _wrap_post_hooks(orig: Callable[..., Any]) -> Callable[..., Any]:
    def run_saved_post_hooks(*args: Any, **kwargs: Any) -> Any:
        current = run.current()
        if current is not None and current.hold_back_summary:
            current.post_hook_calls.append((args, kwargs))
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
    path = os.path.abspath(path)
    missing = paths.missing_dirs(path)
    if not missing:
        raise FileExistsError(17, "File exists", path)  # as os.makedirs(exist_ok=False)
    for directory in missing:
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            if directory == path or not os.path.isdir(directory):
                raise


def _wrap_new_order(orig: Callable[..., Any]) -> Callable[..., Any]:
    def new_order(self: Any, csr_pem: bytes, *args: Any, **kwargs: Any) -> Any:
        hooks = _hooks()
        if hooks is None:
            return orig(self, csr_pem, *args, **kwargs)
        return hooks.new_order(orig, self, csr_pem, *args, **kwargs)
    new_order.__wrapped__ = orig  # type: ignore[attr-defined]
    return new_order


def _wrap_to_partial_json(orig: Callable[..., Any]) -> Callable[..., Any]:
    def to_partial_json(self: Any, *args: Any, **kwargs: Any) -> Any:
        data = orig(self, *args, **kwargs)
        hooks = _hooks()
        cert_id = hooks.replaces() if hooks is not None else None
        if cert_id:
            data = dict(data)
            data["replaces"] = cert_id
        return data
    to_partial_json.__wrapped__ = orig  # type: ignore[attr-defined]
    return to_partial_json


def _wrap_finalize(orig: Callable[..., Any]) -> Callable[..., Any]:
    def finalize_order(self: Any, orderr: Any, *args: Any, **kwargs: Any) -> Any:
        hooks = _hooks()
        if hooks is None:
            return orig(self, orderr, *args, **kwargs)
        return hooks.finalize(orig, self, orderr, *args, **kwargs)
    return finalize_order


def _wrap_send_request(orig: Callable[..., Any]) -> Callable[..., Any]:
    def _send_request(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        hooks = _hooks()
        if hooks is None:
            return orig(self, method, url, *args, **kwargs)
        return hooks.send_request(orig, self, method, url, *args, **kwargs)
    return _send_request


def _wrap_retrying(orig: Callable[..., Any]) -> Callable[..., Any]:
    def retrying(self: Any, *args: Any, **kwargs: Any) -> Any:
        hooks = _hooks()
        if hooks is None:
            return orig(self, *args, **kwargs)
        return hooks.retrying(orig, self, *args, **kwargs)
    return retrying


def _wrap_report_failed(orig: Callable[..., Any]) -> Callable[..., Any]:
    def _report_failed_authzrs(self: Any, failed_authzrs: Any, *args: Any,
                               **kwargs: Any) -> Any:
        hooks = _hooks()
        if hooks is not None:
            hooks.failed_authorizations(_problems(failed_authzrs))
        return orig(self, failed_authzrs, *args, **kwargs)
    return _report_failed_authzrs


def _problems(failed_authzrs: Any) -> list[str]:
    """"name: errorType: detail" of each failed challenge (acme's message objects)."""
    problems: list[str] = []
    with contextlib.suppress(AttributeError, TypeError):
        for authzr in failed_authzrs:
            ident = getattr(authzr.body.identifier, "value", authzr.body.identifier)
            for challb in authzr.body.challenges:
                if challb.error:
                    problems.append(f"{ident}: {challb.error.typ.split(':')[-1]}: "
                                    f"{challb.error.detail}")
    return problems


def _wrap_init_le_client(orig: Callable[..., Any]) -> Callable[..., Any]:
    def _init_le_client(config: Any, authenticator: Any, installer: Any, *args: Any,
                        **kwargs: Any) -> Any:
        hooks = _hooks()
        if hooks is not None:
            config = hooks.client_config(config)
        return orig(config, authenticator, installer, *args, **kwargs)
    return _init_le_client


def _wrap_get_directory(raw: Any) -> Any:
    orig_cm = raw  # a classmethod object

    def get_directory(cls: Any, url: str, net: Any, *args: Any, **kwargs: Any) -> Any:
        fn = orig_cm.__get__(None, cls)
        current = run.current()
        if current is None or args or kwargs:
            return fn(url, net, *args, **kwargs)
        with current.lock:
            found = current.directories.get(url)
        if found is None:
            found = fn(url, net)
            with current.lock:
                current.directories.setdefault(url, found)
        return found
    return classmethod(get_directory)


def _wrap_determine_account(orig: Callable[..., Any]) -> Callable[..., Any]:
    def _determine_account(config: Any, *args: Any, **kwargs: Any) -> Any:
        current = run.current()
        if current is None or args or kwargs:
            return orig(config, *args, **kwargs)
        key = (str(getattr(config, "server", "")), str(getattr(config, "account", "") or ""))
        with current.lock:
            acc = current.accounts.get(key)
        if acc is None:
            acc, acme = orig(config)
            if acme is not None:  # just registered: certbot's own path, nothing to reuse
                return acc, acme
            with current.lock:
                current.accounts.setdefault(key, acc)
        config.account = acc.id  # as certbot's own does
        return acc, None
    return _determine_account


def fallback_config(config: Any, server: str) -> Any:
    """``config`` for a client of another CA: its server, no account of the first one
    (NamespaceConfig: a shallow copy would share its values)."""
    config = copy.deepcopy(config)
    config.server = server
    config.account = None
    return config


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
    ("acme.client", "ClientV2.get_directory"): _wrap_get_directory,
    (_M, "_determine_account"): _wrap_determine_account,
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
    hooks = _hooks()
    if hooks is not None and auth is not None:
        # e.g. a DNS plugin whose perform() joins the wave's grouped perform
        auth = hooks.authenticator(auth, config)
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


# -- DNS plugins (dns_common's per-record contract) ------------------------------------------

def dns_record_methods(auth: Any) -> tuple[Callable[[str, str, str], None],
                                           Callable[[str, str, str], None]]:
    """The plugin's own per-record create and remove (``_perform``/``_cleanup`` of
    certbot's ``dns_common.DNSAuthenticator``: every DNS plugin implements them)."""
    return auth._perform, auth._cleanup  # type: ignore[no-any-return]


def follow_dns_records(auth: Any, perform: Callable[[str, str, str], None],
                       cleanup: Callable[[str, str, str], None]) -> None:
    """Make the plugin object call ``perform``/``cleanup`` for each record (they call
    the methods :func:`dns_record_methods` returned)."""
    auth._perform = perform
    auth._cleanup = cleanup


def dns_setup_credentials(auth: Any) -> None:
    """dns_common's credentials step (what its perform() does first)."""
    auth._setup_credentials()


def dns_remove_record(auth: Any, domain: str, validation_name: str, validation: str) -> None:
    auth._cleanup(domain, validation_name, validation)


def is_dns_common_flow(auth: Any) -> bool:
    """Does the plugin use dns_common's own perform()/cleanup(), i.e. create and remove
    each record through ``_perform``/``_cleanup``?"""
    from certbot.plugins import dns_common

    return type(auth).perform is dns_common.DNSAuthenticator.perform and \
        type(auth).cleanup is dns_common.DNSAuthenticator.cleanup


# -- acme --------------------------------------------------------------------------------------

def account_uri(client: Any) -> str:
    """The account URI an acme ClientV2 talks as (its ClientNetwork's ``account``)."""
    net = getattr(client, "net", None)
    account = getattr(net, "account", None)
    return str(getattr(account, "uri", "") or "")
