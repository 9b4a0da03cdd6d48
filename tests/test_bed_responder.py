"""The test bed's lineage farm and ARI/OCSP responder do what they say (fast, loopback only)."""

from __future__ import annotations

import copy
import datetime
import io
import os
import stat
import threading
from typing import Any, Dict, Iterator, List, Tuple

import configobj
import pytest
import requests
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from tests.bed import farm
from tests.bed.farm import FarmCA, cert_id, make_farm, renew_lineage_version
from tests.bed.responder import (
    ARI_FAULTS,
    OCSP_FAULTS,
    Responder,
    cert_id_from_parts,
    due_policy,
    parse_cert_id,
)

UTC = datetime.timezone.utc
SERVER = "http://127.0.0.1:9/dir"  # stored in confs only, never contacted


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def ca() -> FarmCA:
    return FarmCA.create("Test Farm")


@pytest.fixture(scope="module")
def leaf_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture()
def responder(ca: FarmCA) -> Iterator[Responder]:
    with Responder(ca) as r:
        yield r


@pytest.fixture()
def http() -> Iterator[requests.Session]:
    s = requests.Session()
    s.trust_env = False  # no proxies for loopback
    yield s
    s.close()


def _leaf(ca: FarmCA, key: ec.EllipticCurvePrivateKey, ocsp_url: str | None = None,
          names: Tuple[str, ...] = ("leaf.test",)) -> x509.Certificate:
    now = datetime.datetime.now(UTC)
    return ca.issue(list(names), key.public_key(), not_before=now - datetime.timedelta(days=1),
                    not_after=now + datetime.timedelta(days=89), ocsp_url=ocsp_url)


def _certbot_config(tmp_path: Any, config_dir: str) -> Any:
    from certbot import configuration
    from certbot._internal import cli
    from certbot._internal.plugins import disco

    config = cli.prepare_and_parse_args(disco.PluginsRegistry.find_all(), [
        "renew", "--config-dir", config_dir, "--work-dir", str(tmp_path / "work"),
        "--logs-dir", str(tmp_path / "logs"), "--no-random-sleep-on-renew",
    ])
    # certbot < 2.3 returns the argparse Namespace; main() wraps it as below.
    if not isinstance(config, configuration.NamespaceConfig):
        config = configuration.NamespaceConfig(config)
    return config


def _certbot_ocsp() -> Any:
    """certbot's OCSP checker: certbot._internal.ocsp, or certbot.ocsp in older releases
    (Debian 12's 2.1)."""
    try:
        from certbot._internal import ocsp as certbot_ocsp
    except ImportError:
        from certbot import ocsp as certbot_ocsp  # type: ignore[no-redef]
    return certbot_ocsp


def _needs_acme_ari() -> None:
    """acme's own ARI client (ClientV2.renewal_time, acme >= 4.1) checks our responder."""
    from acme import client as acme_client

    if not hasattr(acme_client.ClientV2, "renewal_time"):
        from importlib.metadata import version

        pytest.skip(f"acme {version('acme')} has no ARI client "
                    "(ClientV2.renewal_time: acme >= 4.1)")


# --------------------------------------------------------------------------------------------
# farm


def test_farm_layout(tmp_path: Any, ca: FarmCA) -> None:
    cfg = str(tmp_path / "le")
    names = make_farm(cfg, 5, ca=ca, server=SERVER, ocsp_url="http://127.0.0.1:9/ocsp",
                      webroot="/srv/www", account="a" * 32, names_per_lineage=2,
                      renew_before_expiry="30 days", autorenew=False,
                      extra_renewalparams={"pref_challs": ["http-01"], "foo": "bar"},
                      lifetime=datetime.timedelta(days=90), age=datetime.timedelta(days=70))
    assert names == [f"lin{i:05d}.test" for i in range(5)]
    for d in ("archive", "live", "renewal"):
        assert stat.S_IMODE(os.stat(os.path.join(cfg, d)).st_mode) == 0o700
    assert os.path.isfile(os.path.join(cfg, "live", "README"))
    for name in names:
        adir, ldir = os.path.join(cfg, "archive", name), os.path.join(cfg, "live", name)
        assert sorted(os.listdir(adir)) == sorted(f"{k}1.pem" for k in farm.ALL_FOUR)
        assert stat.S_IMODE(os.stat(os.path.join(adir, "privkey1.pem")).st_mode) == 0o600
        assert sorted(os.listdir(ldir)) == sorted(["README"] + [f"{k}.pem" for k in farm.ALL_FOUR])
        for kind in farm.ALL_FOUR:
            link = os.path.join(ldir, f"{kind}.pem")
            assert os.readlink(link) == f"../../archive/{name}/{kind}1.pem"
            assert os.path.exists(link)
        with open(os.path.join(adir, "fullchain1.pem"), "rb") as f:
            full = f.read()
        with open(os.path.join(adir, "cert1.pem"), "rb") as f:
            assert full == f.read() + ca.chain_pem

        conf = configobj.ConfigObj(os.path.join(cfg, "renewal", f"{name}.conf"),
                                   encoding="utf-8", default_encoding="utf-8")
        assert conf["archive_dir"] == adir
        assert conf["cert"] == os.path.join(ldir, "cert.pem")
        assert conf["renew_before_expiry"] == "30 days"
        rp = conf["renewalparams"]
        assert rp["authenticator"] == "webroot"
        assert rp["server"] == SERVER
        assert rp["account"] == "a" * 32
        assert rp["key_type"] == "ecdsa"
        assert rp["webroot_path"] == ["/srv/www"]
        assert dict(rp["webroot_map"]) == {name: "/srv/www", f"alt1.{name}": "/srv/www"}
        assert rp["pref_challs"] == ["http-01"]
        assert rp["foo"] == "bar"
        assert rp.as_bool("autorenew") is False

        cert = farm.load_lineage_cert(cfg, name)
        assert cert.extensions.get_extension_for_class(
            x509.AuthorityKeyIdentifier).value.key_identifier == ca.aki
        assert cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        assert aia[0].access_location.value == "http://127.0.0.1:9/ocsp"
        life = farm.cert_not_after(cert) - farm.cert_not_before(cert)
        assert life == datetime.timedelta(days=90)
        age = datetime.datetime.now(UTC) - farm.cert_not_before(cert)
        assert datetime.timedelta(days=70) <= age < datetime.timedelta(days=70, minutes=5)
    # one shared key by default
    keys = set()
    for name in names:
        with open(os.path.join(cfg, "live", name, "privkey.pem"), "rb") as f:
            keys.add(f.read())
    assert len(keys) == 1
    assert farm.lineage_names(cfg) == names


def test_farm_loads_with_certbot(tmp_path: Any, ca: FarmCA) -> None:
    from certbot._internal import renewal, storage

    cfg = str(tmp_path / "le")
    names = make_farm(cfg, 5, ca=ca, server=SERVER, webroot=str(tmp_path / "www"),
                      names_per_lineage=3, start_index=10, share_key=False)
    assert names[0] == "lin00010.test"
    config = _certbot_config(tmp_path, cfg)
    confs = storage.renewal_conf_files(config)
    assert [storage.lineagename_for_filename(c) for c in confs] == names
    for conf in confs:
        lineage = storage.RenewableCert(conf, config)
        assert lineage.latest_common_version() == 1
        assert not lineage.has_pending_deployment()
        assert lineage.names()[0] == lineage.lineagename
        assert len(lineage.names()) == 3
        assert lineage.autorenewal_is_enabled()
        # what `certbot renew` does with it: reconstitute restores the plugin config
        lineage_config = copy.deepcopy(config)
        # public since certbot 2.3 or so; _reconstitute in Debian 12's 2.1
        reconstitute = getattr(renewal, "reconstitute", None) or renewal._reconstitute
        renewal_candidate = reconstitute(lineage_config, conf)
        assert renewal_candidate is not None
        assert lineage_config.authenticator == "webroot"
        assert lineage_config.webroot_map[lineage.lineagename] == str(tmp_path / "www")


def test_farm_forked_workers(tmp_path: Any, ca: FarmCA) -> None:
    cfg = str(tmp_path / "le")
    names = make_farm(cfg, 400, ca=ca, server=SERVER, workers=2, start_index=7)
    assert names == [f"lin{i:05d}.test" for i in range(7, 407)]
    assert farm.lineage_names(cfg) == names
    serials = {farm.load_lineage_cert(cfg, n).serial_number for n in names[::20] + names[-3:]}
    assert len(serials) == len(names[::20] + names[-3:])


def test_conf_text_matches_configobj() -> None:
    params: Dict[str, Any] = {
        "account": "abc", "authenticator": "webroot", "installer": "apache",
        "webroot_path": ["/var/www/with space", "/b"], "server": "https://x.test/dir?a=b,c",
        "key_type": "rsa", "rsa_key_size": 2048, "must_staple": True,
        "pre_hook": "echo 'x' \"y\" # z", "pref_challs": [],
        "webroot_map": {"a.test": "/v, #x", "*.b.test": "/w"},
    }
    mine = farm.renewal_conf_text(version="5.8.0", archive_dir="/c/archive/a",
                                  live_dir="/c/live/a", renewalparams=params,
                                  renew_before_expiry="2 weeks")
    co = configobj.ConfigObj(encoding="utf-8", default_encoding="utf-8")
    co["version"] = "5.8.0"
    co["archive_dir"] = "/c/archive/a"
    co["renew_before_expiry"] = "2 weeks"
    for kind in farm.ALL_FOUR:
        co[kind] = f"/c/live/a/{kind}.pem"
    co["renewalparams"] = {}
    co["renewalparams"].update(params)
    out = io.BytesIO()
    co.write(outfile=out)
    assert mine == out.getvalue().decode()


def test_renew_lineage_version(tmp_path: Any, ca: FarmCA) -> None:
    from certbot._internal import storage

    cfg = str(tmp_path / "le")
    (name,) = make_farm(cfg, 1, ca=ca, server=SERVER, ocsp_url="http://127.0.0.1:9/ocsp")
    old = farm.load_lineage_cert(cfg, name)
    assert renew_lineage_version(cfg, name, ca) == 2
    new = farm.load_lineage_cert(cfg, name)
    assert new.serial_number != old.serial_number
    assert new == farm.load_lineage_cert(cfg, name, version=2)
    assert farm.cert_not_after(new) > farm.cert_not_after(old)
    assert os.readlink(os.path.join(cfg, "live", name, "cert.pem")) == \
        f"../../archive/{name}/cert2.pem"
    assert cert_id(new) != cert_id(old)
    # reuse_key: privkey3.pem is a symlink, as certbot's save_successor makes it
    assert renew_lineage_version(cfg, name, ca, reuse_key=True, ocsp_url="") == 3
    assert os.readlink(os.path.join(cfg, "archive", name, "privkey3.pem")) == "privkey2.pem"
    with pytest.raises(x509.ExtensionNotFound):
        farm.load_lineage_cert(cfg, name).extensions.get_extension_for_class(
            x509.AuthorityInformationAccess)

    lineage = storage.RenewableCert(os.path.join(cfg, "renewal", f"{name}.conf"),
                                    _certbot_config(tmp_path, cfg))
    assert lineage.latest_common_version() == 3
    assert lineage.current_version("cert") == 3
    assert not lineage.has_pending_deployment()
    with open(lineage.cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(lineage.key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    assert cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    pub = issuer.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    pub.verify(cert.signature, cert.tbs_certificate_bytes,
               ec.ECDSA(cert.signature_hash_algorithm))
    assert cert.issuer == issuer.subject


@pytest.mark.parametrize("intermediate", [True, False])
def test_ca_save_load_and_chain(tmp_path: Any, leaf_key: ec.EllipticCurvePrivateKey,
                                intermediate: bool) -> None:
    ca = FarmCA.create(intermediate=intermediate)
    ca.save(str(tmp_path / "ca"))
    assert stat.S_IMODE(os.stat(tmp_path / "ca" / "root.key").st_mode) == 0o600
    loaded = FarmCA.load(str(tmp_path / "ca"))
    assert loaded.root_cert == ca.root_cert
    assert loaded.issuer_cert == ca.issuer_cert
    assert loaded.aki == ca.aki
    assert (loaded.intermediate_cert is not None) == intermediate
    leaf = _leaf(loaded, leaf_key)
    _verify_issued_by(leaf, ca.issuer_cert)
    if intermediate:
        assert ca.intermediate_cert is not None
        _verify_issued_by(ca.intermediate_cert, ca.root_cert)
    ski = ca.issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski.digest == ca.aki


def test_farm_cli(tmp_path: Any) -> None:
    cfg = tmp_path / "cli" / "le"
    rc = farm.main(["--config-dir", str(cfg), "--count", "3", "--server", SERVER,
                    "--ocsp-url", "http://127.0.0.1:9/ocsp", "--lifetime-days", "6",
                    "--age-days", "5", "--authenticator", "batch-webroot", "--webroot", "/w",
                    "--installer", "apache", "--param", "reuse_key=True"])
    assert rc == 0
    assert farm.lineage_names(str(cfg)) == ["lin00000.test", "lin00001.test", "lin00002.test"]
    assert os.path.isfile(tmp_path / "cli" / "farm-ca" / "root.pem")
    conf = configobj.ConfigObj(str(cfg / "renewal" / "lin00001.test.conf"))
    assert conf["renewalparams"]["installer"] == "apache"
    assert conf["renewalparams"]["reuse_key"] == "True"
    assert conf["renewalparams"]["webroot_map"]["lin00001.test"] == "/w"
    cert = farm.load_lineage_cert(str(cfg), "lin00001.test")
    assert farm.cert_not_after(cert) - farm.cert_not_before(cert) == datetime.timedelta(days=6)
    # a second run reuses the saved CA
    assert farm.main(["--config-dir", str(cfg), "--count", "1", "--server", SERVER,
                      "--start-index", "3"]) == 0
    ca = FarmCA.load(str(tmp_path / "cli" / "farm-ca"))
    assert farm.lineage_cert_ids(str(cfg))["lin00003.test"].startswith(
        farm._b64url(ca.aki) + ".")


# --------------------------------------------------------------------------------------------
# certID and ARI


def test_cert_id_matches_acme(ca: FarmCA, leaf_key: ec.EllipticCurvePrivateKey) -> None:
    from acme import client as acme_client

    for serial in (1, 127, 128, 255, 256, 2**63, 2**159 - 1):
        now = datetime.datetime.now(UTC)
        cert = ca.issue(["s.test"], leaf_key.public_key(), not_before=now,
                        not_after=now + datetime.timedelta(days=1), serial=serial)
        cid = cert_id(cert)
        if hasattr(acme_client, "_renewal_info_path_component"):  # acme >= 4.1 (ARI)
            assert cid == acme_client._renewal_info_path_component(cert)
        assert cid == cert_id_from_parts(ca.aki, serial)
        assert parse_cert_id(cid) == (ca.aki, serial)
    with pytest.raises(ValueError):
        parse_cert_id("no-dot")
    with pytest.raises(ValueError):
        parse_cert_id("abc.")


def _acme_client(r: Responder) -> Any:
    from acme import client as acme_client
    from acme import messages

    net = acme_client.ClientNetwork(key=None, verify_ssl=False, user_agent="bed-test")
    net.session.trust_env = False
    directory = messages.Directory.from_json(net.get(r.directory_url).json())
    return acme_client.ClientV2(directory, net)


def test_acme_client_reads_our_ari(responder: Responder, ca: FarmCA,
                                   leaf_key: ec.EllipticCurvePrivateKey) -> None:
    _needs_acme_ari()
    cert = _leaf(ca, leaf_key)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    start = datetime.datetime(2030, 1, 1, tzinfo=UTC)
    end = datetime.datetime(2030, 1, 3, tzinfo=UTC)
    responder.set_window(cert, start, end, retry_after=3600)
    client = _acme_client(responder)
    before = datetime.datetime.now()
    when, retry = client.renewal_time(pem)
    assert when is not None and start <= when <= end
    assert datetime.timedelta(minutes=59) < retry - before <= datetime.timedelta(hours=1, seconds=5)
    assert responder.ari_requests == 1
    assert responder.ari_requests_for(cert) == 1
    assert responder.ari_requests_by_cert_id() == {cert_id(cert): 1}
    assert responder.directory_requests == 1


def test_directory_without_renewal_info(ca: FarmCA, leaf_key: ec.EllipticCurvePrivateKey,
                                        http: requests.Session) -> None:
    with Responder(ca, renewal_info=False) as r:
        assert "renewalInfo" not in http.get(r.directory_url).json()
        client = _acme_client(r)
        if hasattr(client, "renewal_time"):  # acme >= 4.1 (ARI)
            when, _retry = client.renewal_time(
                _leaf(ca, leaf_key).public_bytes(serialization.Encoding.PEM))
            assert when is None
        assert r.ari_requests == 0
        r.renewal_info = True
        assert http.get(r.directory_url).json()["renewalInfo"] == r.renewal_info_url
        r.set_fault("no_renewal_info", kind="directory", count=1)
        assert "renewalInfo" not in http.get(r.directory_url).json()
        assert "renewalInfo" in http.get(r.directory_url).json()
        for path in ("newNonce", "newAccount", "newOrder"):
            assert http.get(r.directory_url).json()[path].startswith(r.base_url)


def _rfc3339(text: str) -> datetime.datetime:
    value = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert value.tzinfo is not None, text
    return value


def test_ari_windows_and_policies(responder: Responder, ca: FarmCA,
                                  leaf_key: ec.EllipticCurvePrivateKey,
                                  http: requests.Session) -> None:
    from acme import messages

    cert = _leaf(ca, leaf_key)
    url = f"{responder.renewal_info_url}/{cert_id(cert)}"

    def window(resp: requests.Response) -> Tuple[datetime.datetime, datetime.datetime]:
        assert resp.status_code == 200
        assert resp.headers["Content-Type"] == "application/json"
        if hasattr(messages, "RenewalInfo"):  # acme >= 4.1 parses it as certbot will
            info = messages.RenewalInfo.from_json(resp.json())
            return info.suggested_window.start, info.suggested_window.end
        window = resp.json()["suggestedWindow"]
        return (_rfc3339(window["start"]), _rfc3339(window["end"]))

    # default policy: not due, 30..32 days out, Retry-After 6 h
    resp = http.get(url)
    start, end = window(resp)
    now = datetime.datetime.now(UTC)
    assert datetime.timedelta(days=29) < start - now <= datetime.timedelta(days=30)
    assert end - start == datetime.timedelta(days=2)
    assert resp.headers["Retry-After"] == "21600"
    assert "explanationURL" not in resp.json()
    assert responder.window_for(cert_id(cert)) is not None

    # per serial, relative to the request time, with an explanation URL
    responder.set_window(cert.serial_number, datetime.timedelta(hours=-2),
                         datetime.timedelta(hours=-1), explanation_url="https://x.test/why")
    resp = http.get(url)
    start, end = window(resp)
    assert end < datetime.datetime.now(UTC)
    assert resp.json()["explanationURL"] == "https://x.test/why"
    # per certID wins over per serial
    responder.set_window(cert_id(cert), datetime.datetime(2031, 5, 1, tzinfo=UTC),
                         datetime.datetime(2031, 5, 2, tzinfo=UTC))
    assert window(http.get(url))[0] == datetime.datetime(2031, 5, 1, tzinfo=UTC)
    responder.clear_window()

    # policies: everything due; None means 404 (unknown cert)
    responder.policy = due_policy
    start, end = window(http.get(url))
    assert start < datetime.datetime.now(UTC) < end
    responder.policy = lambda _cid: None
    assert http.get(url).status_code == 404
    responder.retry_after = None
    responder.policy = due_policy
    assert "Retry-After" not in http.get(url).headers

    # malformed certIDs are 400 problems
    resp = http.get(f"{responder.renewal_info_url}/not-a-cert-id")
    assert resp.status_code == 400
    assert resp.headers["Content-Type"] == "application/problem+json"


@pytest.mark.parametrize("mode", sorted(ARI_FAULTS))
def test_ari_faults(responder: Responder, ca: FarmCA, leaf_key: ec.EllipticCurvePrivateKey,
                    http: requests.Session, mode: str) -> None:
    cert = _leaf(ca, leaf_key)
    other = _leaf(ca, leaf_key, names=("other.test",))
    url = f"{responder.renewal_info_url}/{cert_id(cert)}"
    other_url = f"{responder.renewal_info_url}/{cert_id(other)}"
    responder.set_fault(mode, key=cert, retry_after=120, hold=30)
    assert responder.faults() == {("ari", cert_id(cert)): mode}

    if mode == "timeout":
        with pytest.raises(requests.exceptions.ReadTimeout):
            http.get(url, timeout=0.3)
    else:
        resp = http.get(url, timeout=10)
        if mode == "http500":
            assert resp.status_code == 500
        elif mode == "http503":
            assert resp.status_code == 503
            assert resp.headers["Retry-After"] == "120"
        elif mode == "http404":
            assert resp.status_code == 404
        elif mode == "malformed_json":
            assert resp.status_code == 200
            with pytest.raises(ValueError):
                resp.json()
        elif mode == "missing_window":
            assert resp.status_code == 200 and "suggestedWindow" not in resp.json()
        elif mode in ("inverted_window", "empty_window"):
            win = resp.json()["suggestedWindow"]
            start = datetime.datetime.fromisoformat(win["start"].replace("Z", "+00:00"))
            end = datetime.datetime.fromisoformat(win["end"].replace("Z", "+00:00"))
            assert end < start if mode == "inverted_window" else end == start
        elif mode == "bad_retry_after":
            assert resp.status_code == 200
            assert resp.headers["Retry-After"] == "soon-ish"
            assert "suggestedWindow" in resp.json()
        else:  # pragma: no cover
            pytest.fail(f"untested mode {mode}")
    # the fault is per certID: another cert is answered normally
    ok = http.get(other_url, timeout=10)
    assert ok.status_code == 200 and ok.headers["Retry-After"] == "21600"
    # cleared: back to normal
    responder.clear_fault("ari", cert)
    assert http.get(url, timeout=10).status_code == 200
    responder.release_held()  # a held (timeout) request drops its connection now
    assert responder.wait_idle(10)
    statuses = [e.status for e in responder.log() if e.path.endswith(cert_id(cert))]
    first = {"timeout": 0, "http500": 500, "http503": 503, "http404": 404}.get(mode, 200)
    assert sorted(statuses) == sorted([first, 200])


def test_ari_503_storm_counts_down(responder: Responder, ca: FarmCA,
                                   leaf_key: ec.EllipticCurvePrivateKey,
                                   http: requests.Session) -> None:
    certs = [_leaf(ca, leaf_key, names=(f"s{i}.test",)) for i in range(4)]
    responder.set_fault("http503", count=3, retry_after=7)  # global: any certID
    codes = [http.get(f"{responder.renewal_info_url}/{cert_id(c)}").status_code for c in certs]
    assert codes == [503, 503, 503, 200]
    assert responder.faults() == {}
    # "until cleared"
    responder.set_fault("http500")
    assert all(http.get(f"{responder.renewal_info_url}/{cert_id(c)}").status_code == 500
               for c in certs)
    responder.clear_faults()
    assert http.get(f"{responder.renewal_info_url}/{cert_id(certs[0])}").status_code == 200
    assert responder.ari_requests == 9


def test_directory_faults(responder: Responder, http: requests.Session) -> None:
    responder.set_fault("malformed_json", kind="directory", count=1)
    with pytest.raises(ValueError):
        http.get(responder.directory_url).json()
    responder.set_fault("http503", kind="directory", count=1, retry_after=5)
    resp = http.get(responder.directory_url)
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "5"
    responder.set_fault("timeout", kind="directory", count=1, hold=30)
    with pytest.raises(requests.exceptions.ReadTimeout):
        http.get(responder.directory_url, timeout=0.3)
    assert http.get(responder.directory_url).status_code == 200
    assert responder.directory_requests == 4
    with pytest.raises(ValueError):
        responder.set_fault("garbage", kind="directory")
    with pytest.raises(ValueError):
        responder.set_fault("http500", kind="nope")


def test_latency_does_not_block_other_requests(responder: Responder, ca: FarmCA,
                                               leaf_key: ec.EllipticCurvePrivateKey) -> None:
    slow, fast = _leaf(ca, leaf_key, names=("slow.test",)), _leaf(ca, leaf_key)
    responder.set_latency(1.5, kind="ari", key=slow)
    finished: List[str] = []

    def fetch(cert: x509.Certificate, label: str) -> None:
        with requests.Session() as s:
            s.trust_env = False
            assert s.get(f"{responder.renewal_info_url}/{cert_id(cert)}").status_code == 200
            finished.append(label)

    t = threading.Thread(target=fetch, args=(slow, "slow"))
    t.start()
    fetch(fast, "fast")
    assert t.is_alive()  # the slow one is still held while the fast one was answered
    t.join(timeout=10)
    # Order, not stopwatch: the fast answer came first, the slow one came too.
    assert finished == ["fast", "slow"]
    # global latency applies to everything; 0 removes it
    responder.set_latency(0, kind="ari", key=slow)
    assert responder._latency_for("ari", (cert_id(slow),)) == 0.0
    responder.set_latency(0.25)
    assert responder._latency_for("ocsp", (1,)) == 0.25
    assert responder._latency_for("directory", ()) == 0.25


def test_counters_are_thread_safe(responder: Responder, ca: FarmCA,
                                  leaf_key: ec.EllipticCurvePrivateKey) -> None:
    certs = [_leaf(ca, leaf_key, names=(f"c{i}.test",)) for i in range(5)]
    per_thread = 40

    def worker() -> None:
        with requests.Session() as s:
            s.trust_env = False
            for i in range(per_thread):
                cert = certs[i % len(certs)]
                assert s.get(f"{responder.renewal_info_url}/{cert_id(cert)}").status_code == 200

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert responder.ari_requests == 6 * per_thread
    assert responder.ari_requests_by_cert_id() == {cert_id(c): 6 * per_thread // 5
                                                   for c in certs}
    assert len(responder.log()) == 6 * per_thread
    assert responder.total_requests == 6 * per_thread
    responder.reset_counters()
    assert responder.ari_requests == 0 and responder.log() == []
    assert responder.ari_requests_by_cert_id() == {}


# --------------------------------------------------------------------------------------------
# OCSP


def _ocsp_request(cert: x509.Certificate, issuer: x509.Certificate) -> ocsp.OCSPRequest:
    return ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()


def _post_ocsp(http: requests.Session, r: Responder, req: ocsp.OCSPRequest,
               timeout: float = 10) -> requests.Response:
    return http.post(r.ocsp_url, data=req.public_bytes(serialization.Encoding.DER),
                     headers={"Content-Type": "application/ocsp-request"}, timeout=timeout)


def _certbot_checks(resp: ocsp.OCSPResponse, req: ocsp.OCSPRequest,
                    issuer: x509.Certificate) -> None:
    """certbot's own response validation (signature, CertID, freshness)."""
    _certbot_ocsp()._check_ocsp_response(resp, req, issuer, "cert.pem")


@pytest.mark.parametrize("intermediate", [True, False])
def test_ocsp_good_response_verifies(intermediate: bool, leaf_key: ec.EllipticCurvePrivateKey,
                                     http: requests.Session) -> None:
    ca = FarmCA.create(intermediate=intermediate)
    with Responder(ca) as r:
        cert = _leaf(ca, leaf_key, ocsp_url=r.ocsp_url)
        req = _ocsp_request(cert, ca.issuer_cert)
        resp_http = _post_ocsp(http, r, req)
        assert resp_http.headers["Content-Type"] == "application/ocsp-response"
        resp = ocsp.load_der_ocsp_response(resp_http.content)
        assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
        assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
        assert resp.serial_number == cert.serial_number
        _certbot_checks(resp, req, ca.issuer_cert)
        pub = ca.issuer_cert.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        assert resp.signature_hash_algorithm is not None
        pub.verify(resp.signature, resp.tbs_response_bytes,
                   ec.ECDSA(resp.signature_hash_algorithm))
        # GET form (RFC 6960 appendix A), base64 then URL-encoded
        import base64
        import urllib.parse

        b64 = base64.b64encode(req.public_bytes(serialization.Encoding.DER)).decode()
        resp_get = http.get(f"{r.ocsp_url}/{urllib.parse.quote(b64, safe='')}")
        assert ocsp.load_der_ocsp_response(resp_get.content).serial_number == cert.serial_number
        assert r.ocsp_requests == 2
        assert r.ocsp_requests_by_serial() == {cert.serial_number: 2}
        # a cert from an unknown CA: unauthorized
        stranger = FarmCA.create("Stranger", intermediate=False)
        foreign = _leaf(stranger, leaf_key)
        resp = ocsp.load_der_ocsp_response(
            _post_ocsp(http, r, _ocsp_request(foreign, stranger.issuer_cert)).content)
        assert resp.response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_ocsp_registered_status_with_certbot_checker(tmp_path: Any, ca: FarmCA,
                                                     responder: Responder) -> None:
    """certbot's whole OCSP check (files on disk, POST, validation) against a farm lineage."""
    certbot_ocsp = _certbot_ocsp()
    cfg = str(tmp_path / "le")
    names = make_farm(cfg, 3, ca=ca, server=SERVER, ocsp_url=responder.ocsp_url)
    paths = {n: (os.path.join(cfg, "live", n, "cert.pem"), os.path.join(cfg, "live", n,
                                                                         "chain.pem"))
             for n in names}
    revoked = farm.load_lineage_cert(cfg, names[1])
    responder.set_ocsp_status(revoked, "revoked", reason=x509.ReasonFlags.key_compromise)
    results = {n: certbot_ocsp._check_ocsp_cryptography(c, ch, responder.ocsp_url, 10)
               for n, (c, ch) in paths.items()}
    assert results == {names[0]: False, names[1]: True, names[2]: False}
    checker = certbot_ocsp.RevocationChecker()
    assert checker.ocsp_revoked_by_paths(*paths[names[1]])
    assert not checker.ocsp_revoked_by_paths(*paths[names[0]])
    responder.set_ocsp_status(revoked.serial_number, "good")
    assert not checker.ocsp_revoked_by_paths(*paths[names[1]])


@pytest.mark.parametrize("mode", sorted(OCSP_FAULTS))
def test_ocsp_faults(responder: Responder, ca: FarmCA, leaf_key: ec.EllipticCurvePrivateKey,
                     http: requests.Session, mode: str) -> None:
    cert = _leaf(ca, leaf_key, ocsp_url=responder.ocsp_url)
    other = _leaf(ca, leaf_key, ocsp_url=responder.ocsp_url, names=("other.test",))
    req = _ocsp_request(cert, ca.issuer_cert)
    responder.set_fault(mode, kind="ocsp", key=cert, retry_after=30, hold=30)

    if mode == "timeout":
        with pytest.raises(requests.exceptions.ReadTimeout):
            _post_ocsp(http, responder, req, timeout=0.3)
    else:
        resp_http = _post_ocsp(http, responder, req)
        if mode in ("http500", "http503"):
            assert resp_http.status_code == int(mode[4:])
            if mode == "http503":
                assert resp_http.headers["Retry-After"] == "30"
        else:
            assert resp_http.status_code == 200
            if mode in ("garbage", "malformed"):
                with pytest.raises(ValueError):
                    ocsp.load_der_ocsp_response(resp_http.content)
            else:
                resp = ocsp.load_der_ocsp_response(resp_http.content)
                if mode == "unsigned":
                    assert resp.response_status == ocsp.OCSPResponseStatus.TRY_LATER
                elif mode == "wrong_key":
                    assert resp.responder_name == ca.issuer_cert.subject
                    with pytest.raises(InvalidSignature):
                        _certbot_checks(resp, req, ca.issuer_cert)
                elif mode == "wrong_responder":
                    with pytest.raises(AssertionError, match="not signed by"):
                        _certbot_checks(resp, req, ca.issuer_cert)
                elif mode == "stale":
                    with pytest.raises(AssertionError, match="nextUpdate"):
                        _certbot_checks(resp, req, ca.issuer_cert)
                elif mode in ("revoked", "unknown"):
                    _certbot_checks(resp, req, ca.issuer_cert)
                    assert resp.certificate_status == (
                        ocsp.OCSPCertStatus.REVOKED if mode == "revoked"
                        else ocsp.OCSPCertStatus.UNKNOWN)
                else:  # pragma: no cover
                    pytest.fail(f"untested mode {mode}")
    # other serials are unaffected, and clearing restores normal service
    good = ocsp.load_der_ocsp_response(
        _post_ocsp(http, responder, _ocsp_request(other, ca.issuer_cert)).content)
    assert good.certificate_status == ocsp.OCSPCertStatus.GOOD
    responder.clear_fault("ocsp", cert)
    resp = ocsp.load_der_ocsp_response(_post_ocsp(http, responder, req).content)
    assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
    _certbot_checks(resp, req, ca.issuer_cert)


def test_ocsp_global_fault_with_count(responder: Responder, ca: FarmCA,
                                      leaf_key: ec.EllipticCurvePrivateKey,
                                      http: requests.Session) -> None:
    cert = _leaf(ca, leaf_key, ocsp_url=responder.ocsp_url)
    req = _ocsp_request(cert, ca.issuer_cert)
    responder.set_fault("http500", kind="ocsp", count=2)
    codes = [_post_ocsp(http, responder, req).status_code for _ in range(3)]
    assert codes == [500, 500, 200]
    assert responder.ocsp_requests == 3
    # junk requests get an OCSP malformedRequest answer
    resp = http.post(responder.ocsp_url, data=b"junk")
    assert ocsp.load_der_ocsp_response(resp.content).response_status == \
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def test_log_records_paths_and_statuses(responder: Responder, http: requests.Session) -> None:
    http.get(responder.directory_url)
    http.get(f"{responder.base_url}/nowhere")
    entries: List[Any] = responder.log()
    assert [(e.method, e.path, e.status) for e in entries] == [
        ("GET", "/directory", 200), ("GET", "/nowhere", 404)]
    assert entries[0].time <= entries[1].time


# --------------------------------------------------------------------------------------------
# tests/bed/certs.py on this cryptography (38 on Debian 12: no load_pem_x509_certificates,
# no *_utc accessors)


def test_certs_chain_and_validity_helpers(tmp_path: Any) -> None:
    from tests.bed import certs

    ca = certs.make_ca()
    leaf = certs.make_leaf(["leaf.test", "127.0.0.1"], ca)
    pem = tmp_path / "fullchain.pem"
    pem.write_bytes(leaf.cert_pem() + b"\n" + ca.cert_pem())
    chain = certs.load_pem_chain(pem)
    assert [c.serial_number for c in chain] == [leaf.cert.serial_number, ca.cert.serial_number]
    assert certs.san_names(chain[0]) == ["leaf.test", "127.0.0.1"]
    after, before = certs.not_valid_after(leaf.cert), certs.not_valid_before(leaf.cert)
    assert after.tzinfo is not None and before.tzinfo is not None
    assert after - before == datetime.timedelta(days=31)
    assert before < datetime.datetime.now(UTC) < after
    (tmp_path / "empty.pem").write_bytes(b"not a certificate\n")
    with pytest.raises(ValueError):
        certs.load_pem_chain(tmp_path / "empty.pem")
