"""Certificates for the TLS control-plane tests, made at test time with the
openssl CLI (nothing is committed): two CAs, a server certificate for an SNI
name, and client certificates that are good, from the other CA, or expired.

EC P-256 keys keep generation fast. The expired certificate is signed with
`openssl ca -startdate/-enddate`, which OpenSSL 3.0 has (`x509 -not_after`
only arrived in 3.4)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVER_NAME = "keys.internal"


def _openssl(*args: str, cwd: Path) -> None:
    out = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, (args, out.stderr)


def _key(dir: Path, name: str) -> Path:
    path = dir / f"{name}.key"
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path), cwd=dir)
    return path


def _ca(dir: Path, name: str) -> tuple[Path, Path]:
    key = _key(dir, name)
    cert = dir / f"{name}.pem"
    _openssl(
        "req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=keygate test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=dir,
    )
    return cert, key


def _leaf(dir: Path, name: str, ca: tuple[Path, Path], ext: str, dates: tuple[str, str] | None = None) -> tuple[Path, Path]:
    """A certificate for `name` signed by `ca`, valid for 2 days or between `dates` (YYYYMMDDHHMMSSZ)."""
    key = _key(dir, name)
    csr, cert, extfile = dir / f"{name}.csr", dir / f"{name}.pem", dir / f"{name}.ext"
    extfile.write_text(f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n{ext}\n")
    _openssl("req", "-new", "-key", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=dir)
    if dates is None:
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(extfile), cwd=dir,
        )
        return cert, key
    db = dir / f"{name}.ca"
    db.mkdir()
    (db / "index.txt").write_text("")
    (db / "serial").write_text("1000\n")
    conf = db / "ca.cnf"
    conf.write_text(
        "[ca]\ndefault_ca=d\n[d]\n"
        f"database={db / 'index.txt'}\nnew_certs_dir={db}\nserial={db / 'serial'}\n"
        "default_md=sha256\npolicy=p\nunique_subject=no\n[p]\ncommonName=supplied\n"
    )
    _openssl(
        "ca", "-batch", "-config", str(conf), "-cert", str(ca[0]), "-keyfile", str(ca[1]), "-in", str(csr),
        "-out", str(cert), "-startdate", dates[0], "-enddate", dates[1], "-extfile", str(extfile), "-notext", cwd=dir,
    )
    return cert, key


@dataclass
class TlsMaterial:
    ca: Path  # the CA of the control plane and of good clients
    other_ca: Path  # a CA nobody here trusts
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # a client certificate from other_ca
    stranger_key: Path
    expired_cert: Path  # a client certificate from ca, expired in 2020
    expired_key: Path
    untrusted_server_cert: Path  # a server certificate for SERVER_NAME from other_ca
    untrusted_server_key: Path


def make(dir: Path) -> TlsMaterial:
    dir.mkdir(parents=True, exist_ok=True)
    ca, other = _ca(dir, "ca"), _ca(dir, "other-ca")
    server = _leaf(dir, "server", ca, f"subjectAltName=DNS:{SERVER_NAME}\nextendedKeyUsage=serverAuth")
    untrusted = _leaf(dir, "untrusted-server", other, f"subjectAltName=DNS:{SERVER_NAME}\nextendedKeyUsage=serverAuth")
    client = _leaf(dir, "client", ca, "extendedKeyUsage=clientAuth")
    stranger = _leaf(dir, "stranger", other, "extendedKeyUsage=clientAuth")
    expired = _leaf(dir, "expired", ca, "extendedKeyUsage=clientAuth", ("20200101000000Z", "20200102000000Z"))
    return TlsMaterial(
        ca=ca[0], other_ca=other[0], server_cert=server[0], server_key=server[1], client_cert=client[0],
        client_key=client[1], stranger_cert=stranger[0], stranger_key=stranger[1], expired_cert=expired[0],
        expired_key=expired[1], untrusted_server_cert=untrusted[0], untrusted_server_key=untrusted[1],
    )


if __name__ == "__main__":
    import sys

    print(make(Path(sys.argv[1])))
