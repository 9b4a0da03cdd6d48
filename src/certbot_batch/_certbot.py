"""The one module of certbot-batch that touches ``certbot._internal``.

certbot has no public hook for taking over ``certbot renew``; we wrap a handful of its
internal functions instead. Every such contact lives here, behind a version check: on a
certbot we have not been tested against, or one whose internals moved, we log one clear
warning and leave certbot exactly as it was (stock behaviour, no crash).

Tested against certbot 2.1 (Debian 12) and 5.x (PyPI).
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading
from typing import Any, Callable, Iterator, Optional

logger = logging.getLogger(__name__)

#: certbot majors whose internals this module has been checked against.
SUPPORTED_MAJORS = (2, 3, 4, 5)

BATCH_PLUGINS = ("batch-webroot", "batch-apache")
#: our plugin name -> the stock plugin whose saved settings it takes over.
STOCK_EQUIVALENT = {"batch-webroot": "webroot", "batch-apache": "apache"}

_lock = threading.Lock()
_state: dict[str, Any] = {"installed": False, "disabled_reason": None, "originals": {}}
# Session-scoped overrides consulted by the wrappers (set by session.py via override()).
_overrides: dict[str, Any] = {}


def certbot_version() -> str:
    import certbot

    return str(getattr(certbot, "__version__", "0"))


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def _modules() -> dict[str, Any]:
    names = {
        "renewal": "certbot._internal.renewal",
        "main": "certbot._internal.main",
        "storage": "certbot._internal.storage",
        "disco": "certbot._internal.plugins.disco",
        "hooks": "certbot._internal.hooks",
        "cli": "certbot._internal.cli",
        "client": "certbot._internal.client",
        "error_handler": "certbot._internal.error_handler",
    }
    return {key: importlib.import_module(mod) for key, mod in names.items()}


_REQUIRED = (
    ("renewal", "handle_renewal_request"),
    ("renewal", "should_renew"),
    ("renewal", "_restore_plugin_configs"),
    ("storage", "renewal_conf_files"),
    ("storage", "renewal_file_for_certname"),
    ("storage", "RenewableCert"),
    ("main", "renew_cert"),
    ("disco", "PluginsRegistry"),
    ("client", "Client"),
    ("main", "_init_le_client"),
    ("renewal", "_avoid_invalidating_lineage"),
    ("renewal", "_update_renewal_params_from_key"),
    ("error_handler", "ErrorHandler"),
)


def disabled_reason() -> Optional[str]:
    """Why the renewal engine is off, or None when it is active."""
    return _state["disabled_reason"]


def is_active() -> bool:
    return bool(_state["installed"]) and _state["disabled_reason"] is None


def install() -> bool:
    """Wrap certbot's renewal internals once per process. Returns True when active.

    Called when certbot imports our plugin entry points, which happens at the start of
    every certbot command, before ``renew`` runs.
    """
    with _lock:
        if _state["installed"] or _state["disabled_reason"]:
            return is_active()
        version = certbot_version()
        if _major(version) not in SUPPORTED_MAJORS:
            return _disable(f"certbot {version} is not a version certbot-batch supports "
                            f"(majors {SUPPORTED_MAJORS})")
        try:
            mods = _modules()
        except ImportError as exc:
            return _disable(f"certbot {version} internals could not be imported ({exc})")
        for mod, attr in _REQUIRED:
            if not hasattr(mods[mod], attr):
                return _disable(f"certbot {version} has no {mod}.{attr}")
        originals = _state["originals"]
        originals["handle_renewal_request"] = mods["renewal"].handle_renewal_request
        originals["should_renew"] = mods["renewal"].should_renew
        originals["_restore_plugin_configs"] = mods["renewal"]._restore_plugin_configs
        originals["renewal_conf_files"] = mods["storage"].renewal_conf_files
        originals["renew_cert"] = mods["main"].renew_cert
        originals["find_all"] = mods["disco"].PluginsRegistry.__dict__["find_all"]
        originals["obtain_certificate"] = mods["client"].Client.obtain_certificate
        originals["_set_signal_handlers"] = mods["error_handler"].ErrorHandler._set_signal_handlers

        mods["renewal"].handle_renewal_request = _handle_renewal_request
        mods["renewal"].should_renew = _should_renew
        mods["renewal"]._restore_plugin_configs = _restore_plugin_configs
        mods["storage"].renewal_conf_files = _renewal_conf_files
        mods["main"].renew_cert = _renew_cert
        mods["disco"].PluginsRegistry.find_all = classmethod(_find_all)
        mods["client"].Client.obtain_certificate = _obtain_certificate
        mods["error_handler"].ErrorHandler._set_signal_handlers = _set_signal_handlers
        _state["installed"] = True
        return True


def _disable(reason: str) -> bool:
    _state["disabled_reason"] = reason
    message = (f"certbot-batch: renewal engine disabled: {reason}. certbot runs as stock; "
               "the batch plugins still work one lineage at a time. Upgrade certbot-batch "
               "or pin certbot to a supported version.")
    # Plugins are imported before certbot has set up its logging (and certbot 2.x does not
    # replay early warnings on the terminal), so say it on stderr directly, once.
    sys.stderr.write(message + "\n")
    logger.info("%s", message)
    return False


@contextlib.contextmanager
def override(**values: Any) -> Iterator[None]:
    """Session-scoped behaviour for the wrappers; restored on exit."""
    saved = dict(_overrides)
    _overrides.update(values)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


# --- wrappers -------------------------------------------------------------------------

def _handle_renewal_request(config: Any) -> None:
    original = _state["originals"]["handle_renewal_request"]
    from certbot_batch import session

    session.handle_renewal_request(config, original)


def _renewal_conf_files(config: Any) -> list[str]:
    files = _overrides.get("conf_files")
    if files is not None:
        return list(files)
    return list(_state["originals"]["renewal_conf_files"](config))


def _should_renew(config: Any, lineage: Any, *args: Any) -> bool:
    decide = _overrides.get("should_renew")
    if decide is not None:
        verdict = decide(config, lineage)
        if verdict is not None:
            return bool(verdict)
    return bool(_state["originals"]["should_renew"](config, lineage, *args))


def _restore_plugin_configs(config: Any, renewalparams: Any) -> None:
    original = _state["originals"]["_restore_plugin_configs"]
    original(config, renewalparams)
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
        original(config, swapped)


def _renew_cert(config: Any, plugins: Any, lineage: Any) -> None:
    hook = _overrides.get("renew_cert")
    if hook is not None:
        with lineage_context(lineage.lineagename):
            hook(config, lineage,
                 lambda: _state["originals"]["renew_cert"](config, plugins, lineage))
        return
    _state["originals"]["renew_cert"](config, plugins, lineage)


_find_all_cache: dict[str, Any] = {}


def _find_all(cls: Any) -> Any:
    """Plugin discovery once per session: certbot rescans every distribution's entry points
    for every lineage. We keep the entry-point list but build fresh PluginEntryPoint objects
    each call, because certbot caches the initialised plugin on them and each lineage needs
    a plugin built from its own config."""
    original = _state["originals"]["find_all"].__get__(None, cls)
    if not _overrides.get("cache_plugins"):
        return original()
    eps = _find_all_cache.get("entry_points")
    if eps is None:
        registry = original()
        _find_all_cache["entry_points"] = [ep.entry_point for ep in registry.values()]
        return registry
    plugins: dict[str, Any] = {}
    for ep in eps:
        cls._load_entry_point(ep, plugins)
    return cls(plugins)


# --- helpers for the session ----------------------------------------------------------

def renewal_conf_files(config: Any) -> list[str]:
    """All renewal confs, bypassing any session override."""
    return list(_state["originals"].get("renewal_conf_files",
                                        _modules()["storage"].renewal_conf_files)(config))


def renewal_file_for_certname(config: Any, certname: str) -> str:
    return str(_modules()["storage"].renewal_file_for_certname(config, certname))


def lineage_name_for_file(path: str) -> str:
    return str(_modules()["storage"].lineagename_for_filename(path))


def notify(message: str) -> None:
    from certbot.display import util as display_util

    display_util.notify(message)


def call_original_should_renew(config: Any, lineage: Any) -> bool:
    renewal = _modules()["renewal"]
    fn: Callable[..., bool] = _state["originals"]["should_renew"]
    if _major(certbot_version()) >= 4 and hasattr(renewal, "AriClientPool"):
        return bool(fn(config, lineage, renewal.AriClientPool(config)))
    return bool(fn(config, lineage))


def set_by_user(config: Any, name: str) -> bool:
    fn = getattr(config, "set_by_user", None)
    if fn is not None:
        return bool(fn(name))
    cli = _modules()["cli"]
    return bool(cli.set_by_cli(name))


_local = threading.local()


def current_lineage() -> Optional[str]:
    """Name of the lineage being renewed by this thread (inside a batch session)."""
    value = getattr(_local, "lineage", None) or _overrides.get("current_lineage")
    return str(value) if value else None


@contextlib.contextmanager
def lineage_context(name: Optional[str]) -> Iterator[None]:
    saved = getattr(_local, "lineage", None)
    _local.lineage = name
    try:
        yield
    finally:
        _local.lineage = saved


def reconstitute(config: Any, conf_file: str) -> Any:
    renewal = _modules()["renewal"]
    fn = getattr(renewal, "reconstitute", None) or renewal._reconstitute
    return fn(config, conf_file)


def lineage_sans(lineage: Any) -> list[Any]:
    if hasattr(lineage, "sans"):
        return list(lineage.sans())
    return list(lineage.names())


def find_plugins() -> Any:
    return _modules()["disco"].PluginsRegistry.find_all()


def prepare_obtain(config: Any, lineage: Any, plugins: Any) -> Callable[[], Any]:
    """certbot's renew_cert up to (not including) obtaining the certificate: the same
    checks, key reuse, plugin choice and ACME client, so the certificate we obtain ahead of
    certbot's loop honours every setting of the lineage. Returns the obtain callable."""
    mods = _modules()
    renewal, main = mods["renewal"], mods["main"]
    selection = importlib.import_module("certbot._internal.plugins.selection")
    cli = mods["cli"]
    lineage.ensure_deployed()
    original_server = lineage.configuration["renewalparams"].get(
        "server", cli.flag_default("server"))
    renewal._avoid_invalidating_lineage(config, lineage, original_server)
    if hasattr(renewal, "_avoid_reuse_key_conflicts"):
        renewal._avoid_reuse_key_conflicts(config, lineage)
    sans = lineage_sans(lineage)
    new_key = None
    if config.reuse_key and not getattr(config, "new_key", False):
        import os

        new_key = os.path.normpath(lineage.privkey)
        renewal._update_renewal_params_from_key(new_key, config)
    installer, auth = selection.choose_configurator_plugins(config, plugins, "certonly")
    le_client = main._init_le_client(config, auth, installer)
    original_obtain = _state["originals"]["obtain_certificate"]
    return lambda: original_obtain(le_client, sans, new_key)


def _obtain_certificate(self: Any, sans: Any, old_keypath: Optional[str] = None) -> Any:
    prefetched = _overrides.get("prefetched")
    name = current_lineage()
    if prefetched is not None and name is not None and name in prefetched:
        result = prefetched.pop(name)
        if isinstance(result, BaseException):
            raise result  # validated ahead and failed: no second attempt against the CA
        return result
    return _state["originals"]["obtain_certificate"](self, sans, old_keypath)


def _set_signal_handlers(self: Any) -> None:
    # Worker threads of a batch session cannot install signal handlers (Python allows it
    # in the main thread only); the session's main thread handles signals for them.
    if threading.current_thread() is threading.main_thread():
        _state["originals"]["_set_signal_handlers"](self)
