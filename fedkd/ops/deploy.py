"""Deployment helpers: TLS certificates, SuperNode keys, site files and the exact commands.

Flower's deployment engine runs the same ServerApp/ClientApp as the simulation, under
long-running processes: one ``flower-superlink`` (server host) and one
``flower-supernode`` per site. fedkd turns on, by default, the two protections Flower
offers and adds its own (docs/deployment.md explains every step and the threat model):

* **TLS** on the SuperLink's single HTTPS port (Fleet, Control and Runtime APIs) and on its front.
  :func:`write_certificates` makes a private CA and a server certificate whose
  subjectAltName lists every host name / IP address the sites and the operator use to
  reach the SuperLink (a name missing from the SAN makes the TLS handshake fail).
* **SuperNode authentication** (``flower-superlink --enable-supernode-auth``): each site
  holds an EC P-384 key pair (:func:`write_supernode_keys`, OpenSSH encoding, as
  ``ssh-keygen -t ecdsa -b 384`` writes and as ``flower-supernode
  --auth-supernode-private-key`` and ``flwr supernode register`` read); the operator
  registers each public key with the SuperLink through the Control API; a SuperNode
  whose key is not registered is refused.
* **The Control API on the server host only**: the SuperLink listens on
  ``127.0.0.1:<control port>`` (:func:`superlink_command`; the operator's ``flwr`` CLI
  uses that address) and a front on the sites' address forwards the Fleet API only
  (:func:`front_command`, :mod:`fedkd.ops.front`).
* **Only fedkd's app on a site**: SuperNodes run in Flower's ``process`` isolation
  (:func:`supernode_command`) with fedkd's app guard (:func:`guard_command`,
  :mod:`fedkd.ops.appguard`), kept together with it by :func:`run_together`.
* **Identities bound to the same keys** (fedkd's own, :mod:`fedkd.identity`):
  :func:`write_identity_plan` writes ``sites.toml`` beside the keys (partition id -> the
  site's public key); the run config's ``identity.site-keys`` names it, each SuperNode's
  node config names its private key (``identity-key``), and the server refuses any reply
  for partition i that is not signed with site i's key.

Nothing here imports Flower: these are file and command builders, unit-testable anywhere.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shlex
import socket
import tomllib
from collections.abc import Iterable, Mapping, Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
PUBLIC_FILE = "public.npz"
DEFAULT_PORT = 9091
DEFAULT_CONTROL_PORT = 9093
LOOPBACK = "127.0.0.1"
DEFAULT_CONNECTION = "fedkd"
SECRET_MODE = 0o600
PUBLIC_MODE = 0o644


# ------------------------------------------------------------------------ file writing


def write_file(path: str | Path, data: bytes | str, *, mode: int = PUBLIC_MODE) -> Path:
    """Write ``data`` to ``path`` atomically with permissions ``mode``.

    Secrets (private keys) use ``0o600``: the file is created with that mode (never
    world-readable, not even for a moment) and then renamed into place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.chmod(tmp, mode)  # the umask may have narrowed or the file existed before
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _refuse_overwrite(paths: Iterable[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{', '.join(existing)} already exist(s); pass --force to replace "
            "(sites and the SuperLink holding the old files must then be updated too)"
        )


# ------------------------------------------------------------------------ certificates


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def check_hosts(hosts: Sequence[str]) -> list[str]:
    """The SAN entries, cleaned: each a DNS name or an IP address; at least one."""
    cleaned = [h.strip() for h in hosts if h.strip()]
    if not cleaned:
        raise ValueError("give at least one host name or IP address for the server certificate")
    bad = [h for h in cleaned if not _is_ip(h) and not all(
        part and len(part) <= 63 and part.replace("-", "").replace("_", "").isalnum()
        for part in h.rstrip(".").split(".")
    ) and not h.startswith("*.")]
    if bad:
        raise ValueError(f"not a host name or IP address: {', '.join(bad)}")
    return cleaned


@dataclass(frozen=True)
class CertificatePaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def write_certificates(
    directory: str | Path,
    *,
    hosts: Sequence[str],
    days: int = 365,
    overwrite: bool = False,
    organization: str = "fedkd",
    loopback: bool = True,
) -> CertificatePaths:
    """Create a private CA and a server certificate signed by it, for ``hosts``.

    Writes ``ca.crt`` (give to every site and to the operator's ``flwr`` CLI), ``ca.key``
    (keep offline; 0600), ``server.pem`` and ``server.key`` (SuperLink host only; 0600).
    Keys are EC P-384; the server certificate carries ``subjectAltName`` = ``hosts``
    (DNS names and IP addresses), plus ``localhost`` and ``127.0.0.1`` unless
    ``loopback=False`` (the operator's ``flwr`` CLI and the front reach the SuperLink on the
    server host's loopback address), ``serverAuth`` extended key usage, and is valid for
    ``days`` days.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    hosts = check_hosts(hosts)
    if loopback:
        hosts += [h for h in ("localhost", LOOPBACK) if h not in hosts]
    if days < 1:
        raise ValueError(f"days must be >= 1; got {days}")
    directory = Path(directory)
    paths = CertificatePaths(directory / CA_CERT, directory / CA_KEY,
                             directory / SERVER_CERT, directory / SERVER_KEY)
    _refuse_overwrite(vars(paths).values(), overwrite)

    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    until = now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        x509.NameAttribute(NameOID.COMMON_NAME, f"{organization} federation CA"),
    ])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    san = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, hosts[0]),
        ]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(until)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_encipherment=False, key_agreement=True,
                          key_cert_sign=False, crl_sign=False, content_commitment=False,
                          data_encipherment=False, encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    write_file(paths.ca_key, key_pem(ca_key), mode=SECRET_MODE)
    write_file(paths.server_key, key_pem(server_key), mode=SECRET_MODE)
    write_file(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    write_file(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def certificate_hosts(path: str | Path) -> list[str]:
    """The subjectAltName entries of the certificate at ``path`` (for checks and docs)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    ]


# ------------------------------------------------------------------------ SuperNode keys


@dataclass(frozen=True)
class KeyPair:
    name: str
    private: Path
    public: Path


def write_supernode_keys(
    directory: str | Path, names: Sequence[str], *, overwrite: bool = False
) -> list[KeyPair]:
    """One EC P-384 key pair per SuperNode: ``<name>`` (private, OpenSSH PEM, 0600) and
    ``<name>.pub`` (``ecdsa-sha2-nistp384 ...`` line).

    The private key stays on the site's host (``flower-supernode
    --auth-supernode-private-key``); the ``.pub`` file goes to the operator, who registers
    it (``flwr supernode register <name>.pub <connection>``).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ValueError("give at least one SuperNode name")
    bad = [n for n in names if not n.replace("-", "").replace("_", "").isalnum()]
    if bad or len(set(names)) != len(names):
        raise ValueError(
            "SuperNode names must be distinct and use letters, digits, '-' or '_' only; "
            f"got {', '.join(names)}"
        )
    directory = Path(directory)
    pairs = [KeyPair(n, directory / n, directory / f"{n}.pub") for n in names]
    _refuse_overwrite([p for pair in pairs for p in (pair.private, pair.public)], overwrite)
    for pair in pairs:
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH)
        write_file(pair.private, private, mode=SECRET_MODE)
        write_file(pair.public, public + f" fedkd-{pair.name}\n".encode())
    return pairs


def write_identity_plan(directory: str | Path, pairs: Sequence[KeyPair], *, overwrite: bool = False) -> Path:
    """``<directory>/sites.toml``: partition id i -> the i-th key pair's public key (and its
    name), the plan the server checks every reply against (``identity.site-keys``)."""
    from fedkd.identity import PLAN_FILE, plan_toml

    path = Path(directory) / PLAN_FILE
    _refuse_overwrite([path], overwrite)
    plan = plan_toml({i: pair.public.read_text() for i, pair in enumerate(pairs)},
                     names={i: pair.name for i, pair in enumerate(pairs)})
    return write_file(path, "# fedkd identity plan: partition-id -> the site's SuperNode public key\n" + plan)


# ------------------------------------------------------------------------ commands


def address_problem(address: str, *, key: str = "--superlink") -> str | None:
    """Why ``address`` is not a ``HOST:PORT`` a SuperNode or ``flwr`` can dial (None: it is):
    a non-empty host (a name, an IPv4 address or a bracketed IPv6 address) and a port in
    1..65535. Flower would otherwise fail later, or dial a default port silently."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or host in ("[", "]") or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"{key}: must be HOST:PORT with a port in 1..65535, such as server.example.org:9092; got {address!r}"
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        return f"{key}: an IPv6 host must be in brackets, such as [::1]:9092; got {address!r}"
    return None


@dataclass(frozen=True)
class Deployment:
    """Where the sites reach the federation (``address`` = HOST:PORT: the front, or the
    SuperLink itself without one), the SuperLink's loopback port on the server host
    (``control_port``: the operator's ``flwr`` CLI and the front use
    ``127.0.0.1:<control_port>``), where the TLS and key files are, and the operator's
    connection name. ``insecure`` turns TLS and SuperNode authentication off (closed test
    networks only; Flower refuses authentication without TLS)."""

    address: str = f"{LOOPBACK}:{DEFAULT_PORT}"
    certs_dir: Path = Path("certs")
    keys_dir: Path = Path("keys")
    insecure: bool = False
    connection: str = DEFAULT_CONNECTION
    control_port: int = DEFAULT_CONTROL_PORT

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def control_address(self) -> str:
        """The SuperLink on the server host's loopback: Control API (``flwr``) and the front's upstream."""
        return f"{LOOPBACK}:{self.control_port}"


def superlink_command(
    deployment: Deployment,
    *,
    bind_host: str = LOOPBACK,
    port: int | None = None,
    database: str | None = None,
) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication (unless insecure), on
    ``bind_host:port`` (default ``127.0.0.1:<control_port>``: behind the front,
    :func:`front_command`).

    Flower 1.41 serves the Fleet, Control and Runtime APIs on one HTTPS port
    (``--host``/``--port``), the Control API without authentication: bound to loopback,
    only the server host reaches it. ``--disable-runtime-dependency-installation`` keeps
    the SuperLink from re-installing the app's dependencies (torch) for every run.
    """
    port = deployment.control_port if port is None else port
    cmd = ["flower-superlink", "--host", bind_host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if deployment.insecure:
        cmd.append("--insecure")
    else:
        certs = deployment.certs_dir
        cmd += ["--ssl-ca-certfile", str(certs / CA_CERT), "--ssl-certfile", str(certs / SERVER_CERT),
                "--ssl-keyfile", str(certs / SERVER_KEY), "--enable-supernode-auth"]
    if database:
        cmd += ["--database", database]
    return cmd


def front_command(deployment: Deployment, *, bind_host: str = "0.0.0.0", python: str | None = None) -> list[str]:
    """The front (:mod:`fedkd.ops.front`) on ``bind_host:<deployment.port>``: the Fleet API
    forwarded to the SuperLink at ``deployment.control_address``, everything else refused."""
    import sys

    cmd = [python or sys.executable, "-m", "fedkd.cli", "deploy", "front", "--host", bind_host,
           "--port", str(deployment.port), "--upstream", deployment.control_address,
           "--certs", str(deployment.certs_dir)]
    return cmd + (["--insecure"] if deployment.insecure else [])


def node_config_string(values: Mapping[str, Any]) -> str:
    """Flower's ``--node-config`` syntax: space-separated ``key=value`` with TOML values
    (strings quoted), e.g. ``partition-id=0 data-path="/srv/site-0.npz"``."""
    import tomli_w

    parts = []
    for key, value in values.items():
        text = tomli_w.dumps({"v": value}).strip()[len("v = "):]
        if " " in text and not isinstance(value, str):
            raise ValueError(f"node config value for {key!r} cannot contain spaces: {value!r}")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def supernode_command(
    *,
    superlink: str,
    node_config: Mapping[str, Any],
    root_certificates: str | Path | None = None,
    private_key: str | Path | None = None,
    insecure: bool = False,
    runtime_port: int = 9094,
    max_wait_time: float | None = None,
    isolation: str = "process",
) -> list[str]:
    """``flower-supernode`` for one site: its node config (partition id, data files,
    state directory, model), the CA certificate that verifies the SuperLink, and the
    site's private key. ``runtime_port`` is the SuperNode's local Runtime API port
    (127.0.0.1 only); SuperNodes sharing one host need distinct ports.

    ``isolation="process"`` (the default): the SuperNode runs no app itself; the site's
    app guard (:func:`guard_command`) takes each task from that Runtime API and runs only
    fedkd's ClientApp (:mod:`fedkd.ops.appguard`). ``"subprocess"`` is Flower's default,
    which runs whatever app the SuperLink hands out."""
    if isolation not in ("process", "subprocess"):
        raise ValueError(f"isolation: must be one of process, subprocess; got {isolation!r}")
    cmd = ["flower-supernode", "--superlink", superlink, "--port", str(runtime_port),
           "--isolation", isolation, "--node-config", node_config_string(node_config)]
    if insecure:
        cmd.append("--insecure")
    else:
        if root_certificates is None or private_key is None:
            raise ValueError("a TLS SuperNode needs the CA certificate and its private key (or --insecure)")
        cmd += ["--root-certificates", str(root_certificates),
                "--auth-supernode-private-key", str(private_key)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", f"{max_wait_time:g}"]
    return cmd


def guard_command(*, runtime_port: int = 9094, allow_plugins: Sequence[str] = (),
                  fab_hashes: Sequence[str] = (), python: str | None = None) -> list[str]:
    """The site's app guard (``clients.app_guard``) on the SuperNode's Runtime API at
    ``127.0.0.1:<runtime_port>``: it runs a task only when the app is fedkd's
    (:func:`fedkd.ops.appguard.task_problems`), its run config names no import path but
    ``allow_plugins``, and (when any) its hash is one of ``fab_hashes``."""
    import sys

    cmd = [python or sys.executable, "-m", "clients.app_guard", "--runtime-api-address",
           f"{LOOPBACK}:{runtime_port}"]
    for flag, values in (("--allow-plugin", allow_plugins), ("--fab-hash", fab_hashes)):
        for value in values:
            cmd += [flag, value]
    return cmd


def run_together(commands: Mapping[str, Sequence[str]], *, env: Mapping[str, str] | None = None,
                 grace: float = 10.0) -> int:
    """Start every command (the SuperLink and its front; a SuperNode and its app guard) and
    keep them together: when one ends, or on SIGTERM / SIGINT, stop the others (SIGTERM,
    SIGKILL after ``grace`` seconds). Returns the first one's exit status (128 + the
    signal when stopped by one). The children stay in this process's group."""
    import signal
    import subprocess
    import sys
    import time

    received: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001
        received.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    procs: dict[str, subprocess.Popen] = {}
    first: tuple[str, int] | None = None
    try:
        for name, cmd in commands.items():
            procs[name] = subprocess.Popen(list(cmd), env=None if env is None else dict(env))  # noqa: S603
        while first is None and not received:
            first = next(((name, p.returncode) for name, p in procs.items() if p.poll() is not None), None)
            time.sleep(0.2)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        return 128 + received[0]
    name, code = first  # type: ignore[misc]
    print(f"fedkd: {name} exited with status {code}; stopped the rest", file=sys.stderr, flush=True)
    return code if code else 1


def connection_toml(
    deployment: Deployment, *, root_certificates: str | Path | None = None, existing: str = ""
) -> str:
    """The operator's Flower configuration (``$FLWR_HOME/config.toml``) with a SuperLink
    connection named ``deployment.connection`` (TLS verified with ``root_certificates``,
    default ``<certs_dir>/ca.crt``, an absolute path as Flower requires); other
    connections in ``existing`` stay."""
    import tomli_w

    config: dict[str, Any] = tomllib.loads(existing) if existing.strip() else {}
    superlink = config.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": deployment.address}
    if deployment.insecure:
        entry["insecure"] = True
    else:
        ca = Path(root_certificates) if root_certificates else deployment.certs_dir / CA_CERT
        entry["root-certificates"] = str(ca.resolve())
    superlink[deployment.connection] = entry
    superlink.setdefault("default", deployment.connection)
    return tomli_w.dumps(config)


def register_command(deployment: Deployment, public_key: str | Path) -> list[str]:
    return ["flwr", "supernode", "register", str(public_key), deployment.connection]


def run_command(deployment: Deployment, app_dir: str | Path, run_config: Mapping[str, Any]) -> list[str]:
    """``flwr run APP CONNECTION --run-config '...'`` (run-config values as TOML)."""
    cmd = ["flwr", "run", str(app_dir), deployment.connection]
    if run_config:
        cmd += ["--run-config", node_config_string(run_config)]
    return cmd


def shell_line(cmd: Sequence[str]) -> str:
    return " ".join(shlex.quote(part) for part in cmd)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (tests and local demos)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------ site files


def site_file_name(client: int) -> str:
    return f"site-{client}.npz"


def public_file_name() -> str:
    return PUBLIC_FILE


def sha256_file(path: str | Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ExportedFile:
    path: Path
    examples: int
    sha256: str


def export_partitions(config, out_dir: str | Path, *, overwrite: bool = False) -> list[ExportedFile]:  # noqa: ANN001
    """Write the federation's public set and every site's private share as files.

    ``public.npz`` (public inputs and ids, for every host) and ``site-<i>.npz`` (site i's
    train / validation / local test split, for site i's host only), taken from the split
    the run config defines (``data.*``, ``seed``). A SuperNode started with
    ``public-path`` and ``data-path`` pointing at them reproduces exactly the data the
    simulation gives that site (with ``data.standardize = "private"``, scaled by its own
    training part's statistics instead of the pooled ones).
    """
    from fedkd.data import load_federation, save_public_file, save_site_file

    out = Path(out_dir)
    targets = [out / PUBLIC_FILE] + [out / site_file_name(i) for i in range(config.data.num_clients)]
    _refuse_overwrite(targets, overwrite)
    # as read, unscaled: each site applies data.standardize to what it holds (fedkd.ops.node)
    split = load_federation(dataclasses.replace(config.data, standardize="none", public_copies=0), config.seed)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for target in targets:
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}.npz")
        if target.name == PUBLIC_FILE:
            save_public_file(tmp, split.public, num_classes=split.num_classes)
            examples = len(split.public)
        else:
            client = int(target.stem.split("-")[1])
            data = split.clients[client]
            save_site_file(tmp, data, partition_id=client)
            examples = len(data.train) + len(data.val) + len(data.test)
        os.chmod(tmp, PUBLIC_MODE if target.name == PUBLIC_FILE else SECRET_MODE)
        os.replace(tmp, target)
        written.append(ExportedFile(target, examples, sha256_file(target)))
    return written


def app_pyproject(config) -> str:  # noqa: ANN001
    """A minimal Flower app (``pyproject.toml``) running fedkd's ServerApp/ClientApp with
    ``config`` as its run config: ``flwr run`` on it submits exactly that configuration.
    The code comes from the fedkd installed on each host."""
    import tomli_w

    return tomli_w.dumps({
        "project": {"name": "fedkd-deployment", "version": "0.0.0"},
        "tool": {"flwr": {"app": {
            "publisher": "fedkd",
            "components": {"serverapp": "server.server_app:app",
                           "clientapp": "clients.client_app:app"},
            "config": config.to_nested(),
        }}},
    })


def flower_env(flwr_home: str | Path | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: no telemetry, no update check, no per-run
    dependency installation (sites and server use the fedkd already installed)."""
    env = dict(os.environ if base is None else base)
    env.update({"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"})
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def flwr_home() -> Path:
    """Flower's configuration folder: ``$FLWR_HOME``, else ``~/.flwr`` (as Flower reads it)."""
    return Path(os.environ["FLWR_HOME"]) if os.environ.get("FLWR_HOME") else Path.home() / ".flwr"


class RunEnded(RuntimeError):
    """The run ended (failed, stopped) without writing its summary."""


def run_status(run_id: int, connection: str, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """``(status, details)`` of a run as the SuperLink reports it (``flwr ls --run-id``),
    e.g. ``("finished:failed", "ServerApp failed with exception: ...")``; empty when unknown."""
    import json
    import subprocess

    done = subprocess.run(["flwr", "ls", connection, "--run-id", str(run_id), "--format", "json"],
                          env=flower_env(base=env), capture_output=True, text=True, timeout=120, check=False)
    try:
        run = json.loads(done.stdout[done.stdout.index("{"):])["runs"][0]
    except (ValueError, KeyError, IndexError):
        return "", ""
    return str(run.get("status", "")), str(run.get("status-details", ""))


def wait_for_summary(
    run_dir: str | Path,
    *,
    newer_than: float,
    timeout: float,
    poll: float = 1.0,
    ended=None,  # noqa: ANN001  Callable[[], str | None]
    check_every: float = 10.0,
) -> Path:
    """Wait until the run directory holds a ``summary.json`` written after ``newer_than``
    (a Unix time). ``ended()`` (asked every ``check_every`` seconds) returns why the run
    is over, or None while it runs: a run over without a summary raises
    :class:`RunEnded`; ``TimeoutError`` after ``timeout`` seconds."""
    import time

    path = Path(run_dir) / "summary.json"
    start = time.monotonic()
    deadline, next_check = start + timeout, start + check_every

    def written() -> bool:
        return path.is_file() and path.stat().st_mtime >= newer_than

    while time.monotonic() < deadline:
        if written():
            return path
        if ended is not None and time.monotonic() >= next_check:
            next_check = time.monotonic() + check_every
            why = ended()
            if why is not None and not written():
                raise RunEnded(why)
        time.sleep(poll)
    raise TimeoutError(f"no summary in {run_dir} after {timeout:.0f}s (see `flwr log RUN_ID`)")


def deployment_plan(
    deployment: Deployment,
    *,
    sites: Sequence[str],
    server_host: str,
    data_dir: str = "/srv/fedkd/data",
    state_dir: str = "/srv/fedkd/state",
) -> str:
    """Every command of a deployment, host by host, as text (``fedkd deploy plan``)."""
    secure = not deployment.insecure
    lines = [f"# fedkd deployment: SuperLink at {deployment.address}, {len(sites)} site(s)", ""]
    lines += ["## 1. Operator / server host (once)"]
    if secure:
        lines += [f"fedkd deploy certs --out {deployment.certs_dir} --host {server_host}",
                  f"fedkd deploy keys --out {deployment.keys_dir} {' '.join(sites)}"]
    lines += [f"fedkd deploy export-partitions --config RUN.toml --out {data_dir}",
              "#   copy to each site: ca.crt, its private key, public.npz and its site-<i>.npz"]
    if secure:
        lines += [f"#   {deployment.keys_dir}/sites.toml (partition id -> public key, in the order above) "
                  "stays on the server host"]
    lines += [""]
    superlink = ["fedkd", "deploy", "superlink", "--port", str(deployment.port),
                 "--control-port", str(deployment.control_port)]
    superlink += ["--insecure"] if deployment.insecure else ["--certs", str(deployment.certs_dir)]
    lines += ["## 2. Server host: start the SuperLink (keep it running): itself on "
              f"{deployment.control_address} (Control API: this host only),",
              f"##    its front on port {deployment.port} (the Fleet API only: what the sites use)",
              shell_line(superlink), ""]
    lines += ["## 3. Operator, on the server host: point the flwr CLI at the SuperLink's loopback address "
              "and register the sites' public keys",
              shell_line(["fedkd", "deploy", "connect", "--superlink", deployment.control_address]
                         + (["--ca", str(deployment.certs_dir / CA_CERT)] if secure else ["--insecure"]))]
    if secure:
        lines += [shell_line(register_command(deployment, deployment.keys_dir / f"{name}.pub")) for name in sites]
    lines += [""]
    for client, name in enumerate(sites):
        command = ["fedkd", "deploy", "supernode", "--superlink", deployment.address, "--partition-id", str(client),
                   "--public", f"{data_dir}/{PUBLIC_FILE}", "--data", f"{data_dir}/{site_file_name(client)}",
                   "--state-dir", state_dir]
        command += ["--insecure"] if deployment.insecure else ["--ca", f"/etc/fedkd/{CA_CERT}",
                                                               "--key", f"/etc/fedkd/{name}"]
        lines += [f"## 4.{client + 1} Site host '{name}' (partition {client}): start its SuperNode "
                  "and its app guard (runs fedkd's app only)",
                  shell_line(command), ""]
    lines += ["## 5. Operator: submit the run, follow it, collect the outputs",
              "fedkd deploy run --config RUN.toml --set run-name=NAME --wait"
              + (f"   # identities: --site-keys {deployment.keys_dir}/sites.toml (the default)" if secure else ""),
              "flwr ls " + deployment.connection + "          # runs and their status",
              "flwr log RUN_ID " + deployment.connection + " --stream",
              "fedkd compare OUTPUT_DIR/NAME   # on the server host",
              "## resume a stopped run (same settings):",
              "fedkd deploy run --config RUN.toml --set run-name=NAME --resume --wait"]
    return "\n".join(lines)
