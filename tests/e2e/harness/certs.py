"""A throwaway certificate authority for the TLS tests, made with the `openssl` CLI.

Owns key and certificate files under one directory per CA. Everything is EC P-256 with
SHA-256 signatures and X.509 v3 extensions, so rustls/webpki, Java, OpenSSL (librdkafka)
and Go all accept it:

  CA    self-signed, basicConstraints critical CA:TRUE (pathlen 0), keyUsage keyCertSign,
        valid 3 days from now.
  leaf  signed by the CA, basicConstraints CA:FALSE, keyUsage digitalSignature,
        extendedKeyUsage serverAuth + clientAuth (every leaf serves as a server or a client
        certificate), subjectAltName from `sans`, valid 2 days from now.

Keys are unencrypted PKCS#8 PEM ("BEGIN PRIVATE KEY"). Two Pki objects never trust each
other: a leaf of one is the "certificate from the wrong CA" of the other.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

log = logging.getLogger("harness.certs")

CA_DAYS = 3
LEAF_DAYS = 2


@dataclass(frozen=True)
class Leaf:
    """Files of one issued certificate (absolute paths)."""

    name: str
    cert: Path  # PEM: the leaf certificate alone
    key: Path  # PEM: its unencrypted PKCS#8 private key
    chain: Path  # PEM: the leaf, then the CA certificate


class Pki:
    """A CA in `dir` (ca.pem, ca-key.pem), created at once; `issue` signs leaves with it."""

    def __init__(self, dir: Path | str, name: str = "test-ca") -> None:
        self.dir = Path(dir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.ca = self.dir / "ca.pem"
        self.ca_key = self.dir / "ca-key.pem"
        cnf = self.dir / "ca.cnf"
        cnf.write_text(
            _req_config(name)
            + "[ext]\n"
            "basicConstraints = critical, CA:TRUE, pathlen:0\n"
            "keyUsage = critical, keyCertSign, cRLSign\n"
            "subjectKeyIdentifier = hash\n"
        )
        _new_key(self.ca_key)
        _sign(self.ca, CA_DAYS, "req", "-x509", "-new", "-config", cnf, "-extensions", "ext", "-key", self.ca_key)
        log.info("CA %s in %s", name, self.dir)

    def issue(self, name: str, sans: Iterable[str] = ("localhost", "127.0.0.1")) -> Leaf:
        """A new key and certificate with CN=`name` and the given subjectAltNames (an IP
        address becomes an IP SAN, anything else a DNS SAN). Files are named after `name`;
        issuing the same name again replaces them."""
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name == "ca":
            raise ValueError(f"certificate name {name!r}: use letters, digits, '.', '_', '-' (and not 'ca')")
        alt = ", ".join(f"IP:{s}" if _is_ip(s) else f"DNS:{s}" for s in sans)
        leaf = Leaf(name, self.dir / f"{name}.pem", self.dir / f"{name}-key.pem", self.dir / f"{name}-chain.pem")
        cnf = self.dir / f"{name}.cnf"
        csr = self.dir / f"{name}.csr"
        cnf.write_text(
            _req_config(name)
            + "[ext]\n"
            "basicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature\n"
            "extendedKeyUsage = serverAuth, clientAuth\n"
            "subjectKeyIdentifier = hash\n"
            "authorityKeyIdentifier = keyid\n"
            + (f"subjectAltName = {alt}\n" if alt else "")
        )
        _new_key(leaf.key)
        _openssl("req", "-new", "-config", cnf, "-key", leaf.key, "-out", csr)
        ca_args = ["-CA", self.ca, "-CAkey", self.ca_key]
        _sign(leaf.cert, LEAF_DAYS, "x509", "-req", "-in", csr, *ca_args, "-extfile", cnf, "-extensions", "ext")
        csr.unlink()
        leaf.chain.write_text(leaf.cert.read_text() + self.ca.read_text())
        return leaf

    def __repr__(self) -> str:
        return f"Pki({self.name!r}, ca={str(self.ca)!r})"


def _req_config(cn: str) -> str:
    """An openssl config of our own: the system's openssl.cnf must not add extensions."""
    return f"[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = {cn}\n"


def _new_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", path)
    path.chmod(0o600)


def _sign(out: Path, days: int, *args: object) -> None:
    """Run an openssl command that signs a certificate valid from now for `days`, with a
    random positive 63-bit serial (certificates of one CA must not share one)."""
    serial = f"0x{secrets.randbits(62) | 1 << 62:x}"
    _openssl(*args, "-sha256", "-days", days, "-set_serial", serial, "-out", out)


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def _openssl(*args: object) -> None:
    cmd = ["openssl", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr.decode(errors='replace')}")
