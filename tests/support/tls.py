"""Test PKI and password hashes: a throw-away CA, a server certificate for an IP address,
and htpasswd lines, so registries in tests can speak TLS with basic auth.

Owns: `make_ca` / `issue_server_cert` (the `cryptography` package when installed, else
the `openssl` CLI), and `htpasswd_line` (bcrypt, the only hash docker-registry's
htpasswd accepts: Python's `crypt` with METHOD_BLOWFISH where it exists (<= 3.12, on
Debian's libxcrypt), else the `bcrypt` package). Keys are written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.containerd import HarnessError


@dataclass(frozen=True)
class CertPair:
    cert: Path  # PEM certificate
    key: Path  # PEM private key (0600)


def _write_key(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_ca(directory: Path, name: str = "peerstar test CA") -> CertPair:
    """A self-signed CA certificate (valid one day) and its key under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertPair(directory / "ca.pem", directory / "ca.key")
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", str(pair.key), "-out", str(pair.cert), "-days", "1",
                 "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        os.chmod(pair.key, 0o600)
        return pair
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                         False, False), critical=True)
            .sign(key, hashes.SHA256()))
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pair.key, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return pair


def issue_server_cert(ca: CertPair, directory: Path, ip: str) -> CertPair:
    """A server certificate for IP address `ip` (an IP SAN), signed by `ca`."""
    directory.mkdir(parents=True, exist_ok=True)
    pair = CertPair(directory / "server.pem", directory / "server.key")
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:
        csr = directory / "server.csr"
        ext = directory / "server.ext"
        ext.write_text(f"subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth\n"
                       "basicConstraints=CA:FALSE\n")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={ip}")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey",
                 str(ca.key), "-CAcreateserial", "-out", str(pair.cert), "-days", "1",
                 "-extfile", str(ext))
        os.chmod(pair.key, 0o600)
        return pair
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pair.key, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return pair


def _openssl(*args: str) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise HarnessError("neither the cryptography package nor the openssl CLI is "
                           "installed -- run scripts/install.sh")
    proc = subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise HarnessError(f"openssl {' '.join(args)}: {proc.stderr.strip()}")


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash of `password` (cost 10: fast enough, what htpasswd -B uses)."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # removed in Python 3.13

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 10))
        if hashed and hashed.startswith("$2"):
            return hashed
    except ImportError:
        pass
    try:
        import bcrypt
    except ImportError:
        raise HarnessError("no bcrypt: Python's crypt module is gone and the bcrypt package "
                           "is not installed -- run scripts/install.sh") from None
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(10)).decode()


def htpasswd_line(user: str, password: str) -> str:
    return f"{user}:{bcrypt_hash(password)}\n"
