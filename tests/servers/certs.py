"""A throw-away PKI for TLS tests, made with the ``openssl`` command line tool.

One test CA signs one server certificate that is valid for the DNS name
``localhost`` and the IP address ``127.0.0.1``.  Clients that should trust the
servers are given :attr:`TestPKI.ca_file`; clients using only the system trust
store must reject them (which is what the "untrusted certificate" tests rely on).

The extensions follow RFC 5280 closely enough for strict verifiers
(``VERIFY_X509_STRICT``, default from Python 3.13 on): critical basic
constraints and key usage, subject/authority key identifiers, SAN on the leaf.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

CA_SUBJECT = "/O=postbote tests/CN=postbote test CA"
SERVER_SUBJECT = "/O=postbote tests/CN=localhost"
SERVER_SAN = "DNS:localhost,IP:127.0.0.1"
VALID_DAYS = 30

CA_EXTENSIONS = """\
[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

SERVER_EXTENSIONS = f"""\
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = {SERVER_SAN}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


@dataclass(frozen=True)
class TestPKI:
    """Paths of the PEM files of a test CA and the server certificate it signed."""

    __test__ = False  # not a pytest test class despite the name

    ca_file: Path
    ca_key_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        """A server-side SSL context presenting the server certificate."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client-side SSL context that trusts only the test CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def openssl_binary() -> str:
    path = shutil.which("openssl")
    if path is None:
        raise RuntimeError("the openssl command line tool is needed to make test certificates")
    return path


def _openssl(*args: str | Path) -> None:
    result = subprocess.run(
        [openssl_binary(), *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"openssl {' '.join(map(str, args))} failed ({result.returncode}):\n"
            + result.stderr.decode(errors="replace")
        )


def _new_key(path: Path) -> None:
    """An EC P-256 key: fast to generate, accepted everywhere we care about."""
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    path.chmod(0o600)


def make_test_pki(directory: Path) -> TestPKI:
    """Create a CA and a server certificate for localhost/127.0.0.1 in *directory*.

    The files are world-readable except the keys (0600); servers started by
    root read them before dropping privileges.
    """
    directory.mkdir(parents=True, exist_ok=True)
    pki = TestPKI(
        ca_file=directory / "ca.pem",
        ca_key_file=directory / "ca.key",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
    )
    extensions = directory / "extensions.cnf"
    extensions.write_text(CA_EXTENSIONS + SERVER_EXTENSIONS)
    csr = directory / "server.csr"

    _new_key(pki.ca_key_file)
    _openssl(
        "req", "-new", "-x509", "-key", pki.ca_key_file, "-subj", CA_SUBJECT,
        "-days", str(VALID_DAYS), "-sha256", "-config", extensions, "-extensions", "ca",
        "-out", pki.ca_file,
    )  # fmt: skip
    _new_key(pki.key_file)
    _openssl("req", "-new", "-key", pki.key_file, "-subj", SERVER_SUBJECT, "-out", csr)
    _openssl(
        "x509", "-req", "-in", csr, "-CA", pki.ca_file, "-CAkey", pki.ca_key_file,
        "-CAcreateserial", "-days", str(VALID_DAYS), "-sha256",
        "-extfile", extensions, "-extensions", "server", "-out", pki.cert_file,
    )  # fmt: skip
    return pki
