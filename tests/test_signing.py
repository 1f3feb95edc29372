"""Signed artifacts: sign with an EC key, verify the bundle without re-reading files, check what it covers."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from aotpack import signing
from aotpack.errors import AotpackError
from aotpack.signing import SIGNATURE, SignatureError

FILES = {"model.pt2": b"\x7fELF native code" * 64, "weights.safetensors": b"\x00" * 4096, "plan.json": b"{}\n"}


def _write_key(folder: Path, name: str, key) -> tuple[Path, Path]:
    private = folder / f"{name}.pem"
    public = folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two builders' key pairs: (private path, public path) each."""
    folder = tmp_path_factory.mktemp("keys")
    return {name: _write_key(folder, name, ec.generate_private_key(ec.SECP256R1())) for name in ("builder", "other")}


def _write_manifest(folder: Path) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in sorted(folder.iterdir()) if p.name not in ("manifest.json", SIGNATURE)}
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 1, "files": files}, indent=2))


def _artifact(folder: Path) -> Path:
    folder.mkdir()
    for name, data in FILES.items():
        (folder / name).write_bytes(data)
    _write_manifest(folder)
    return folder


@pytest.fixture(scope="module")
def signed_template(tmp_path_factory, keys):
    folder = _artifact(tmp_path_factory.mktemp("signed") / "art")
    signing.sign(folder, key_path=keys["builder"][0])
    return folder


@pytest.fixture
def signed(signed_template, tmp_path) -> Path:
    """A signed artifact folder this test may damage."""
    return Path(shutil.copytree(signed_template, tmp_path / "art"))


def _load_check(folder: Path, trusted: list) -> signing.SignedContents:
    """What a loader does: hold the manifest bytes, hash each file's bytes once, then verify + check_covers."""
    manifest_bytes = (folder / "manifest.json").read_bytes()
    listed = json.loads(manifest_bytes)["files"]
    # The loader compares these with the manifest itself (IntegrityError); here they go to check_covers, which is
    # what catches an attacker who rewrote the manifest to match the changed files.
    hashed = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in listed}
    data = signing.read_signature(folder)
    assert data is not None
    contents = signing.verify(data, trusted_keys=trusted)
    signing.check_covers(contents, manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(), files=hashed)
    return contents


# --- the good path ---------------------------------------------------------------------------------------

def test_signed_folder_verifies_and_covers_every_file(signed, keys):
    contents = _load_check(signed, [keys["builder"][1]])
    assert contents.fingerprint == signing.fingerprint(keys["builder"][1])
    # plain sha256 of each file (not blake3, not shards): the same values manifest.json records
    expect = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in signed.iterdir() if p.name != SIGNATURE}
    assert contents.digests == expect
    assert set(expect) == set(FILES) | {"manifest.json"}


def test_sign_returns_what_it_wrote(tmp_path, keys):
    folder = _artifact(tmp_path / "art")
    info = signing.sign(folder, key_path=keys["builder"][0])
    assert info.path == folder / SIGNATURE and info.path.is_file()
    assert info.fingerprint == signing.fingerprint(keys["builder"][1])
    assert info.digests == signing.verify(info.path.read_bytes(), trusted_keys=[keys["builder"][1]]).digests
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FILES, "manifest.json", SIGNATURE])  # no temp left


def test_signing_again_replaces_the_signature(signed, keys):
    info = signing.sign(signed, key_path=keys["other"][0])  # the old signature.sig is not part of what is signed
    assert _load_check(signed, [keys["other"][1]]).fingerprint == info.fingerprint
    with pytest.raises(SignatureError, match="not signed by any trusted key"):
        _load_check(signed, [keys["builder"][1]])


def test_any_trusted_key_may_have_signed_it(signed, keys):
    trusted = signing.load_trusted_keys([keys["other"][1], keys["builder"][1]])
    assert _load_check(signed, trusted).fingerprint == signing.fingerprint(keys["builder"][1])


def test_verify_does_not_read_the_artifact(signed, keys):
    data = signing.read_signature(signed)
    shutil.rmtree(signed)  # verify works from the bytes alone
    assert "model.pt2" in signing.verify(data, trusted_keys=[keys["builder"][1]]).digests


def test_model_signings_own_verifier_accepts_our_signature(signed, keys):
    """The bundle is a plain model-signing signature: `model_signing verify key` checks it too."""
    import model_signing

    model_signing.verifying.Config().use_elliptic_key_verifier(public_key=keys["builder"][1]).verify(
        signed, signed / SIGNATURE)


# --- tampering -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rewrite_manifest", [False, True], ids=["file-only", "file-and-manifest"])
def test_one_byte_changed_is_refused(signed, keys, rewrite_manifest):
    path = signed / "model.pt2"
    data = bytearray(path.read_bytes())
    data[5] ^= 1
    path.write_bytes(bytes(data))
    if rewrite_manifest:  # an attacker who also fixes the manifest's hashes changes the manifest's own hash
        _write_manifest(signed)
    with pytest.raises(SignatureError, match="manifest.json differs" if rewrite_manifest else "model.pt2 differs"):
        _load_check(signed, [keys["builder"][1]])


def test_added_file_is_refused(signed, keys):
    (signed / "extra.so").write_bytes(b"payload")
    _write_manifest(signed)
    with pytest.raises(SignatureError, match="manifest.json differs"):
        _load_check(signed, [keys["builder"][1]])
    contents = signing.verify(signing.read_signature(signed), trusted_keys=[keys["builder"][1]])
    manifest_sha = contents.digests["manifest.json"]  # even with the signed manifest's hash, the file is named
    with pytest.raises(SignatureError, match="extra.so is not covered"):
        signing.check_covers(contents, manifest_sha256=manifest_sha,
                             files={**{n: contents.digests[n] for n in FILES}, "extra.so": "0" * 64})


def test_removed_file_is_refused(signed, keys):
    (signed / "plan.json").unlink()
    _write_manifest(signed)
    with pytest.raises(SignatureError, match="manifest.json differs"):
        _load_check(signed, [keys["builder"][1]])
    contents = signing.verify(signing.read_signature(signed), trusted_keys=[keys["builder"][1]])
    with pytest.raises(SignatureError, match="attests plan.json, which the manifest does not list"):
        signing.check_covers(contents, manifest_sha256=contents.digests["manifest.json"],
                             files={n: contents.digests[n] for n in FILES if n != "plan.json"})


def test_a_manifest_listing_the_signature_is_refused(signed, keys):
    contents = signing.verify(signing.read_signature(signed), trusted_keys=[keys["builder"][1]])
    with pytest.raises(SignatureError, match="cannot sign itself"):
        signing.check_covers(contents, manifest_sha256=contents.digests["manifest.json"],
                             files={**{n: contents.digests[n] for n in FILES}, SIGNATURE: "0" * 64})


def test_signed_by_another_key_is_refused(signed, keys):
    with pytest.raises(SignatureError, match="not signed by any trusted key") as e:
        _load_check(signed, [keys["other"][1]])
    assert e.value.hint and isinstance(e.value, AotpackError)


def _bundle(folder: Path) -> dict:
    return json.loads((folder / SIGNATURE).read_bytes())


def test_tampered_payload_is_refused(signed, keys):
    bundle = _bundle(signed)
    statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    for resource in statement["predicate"]["resources"]:
        if resource["name"] == "model.pt2":
            resource["digest"] = hashlib.sha256(b"evil").hexdigest()
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    with pytest.raises(SignatureError, match="does not verify with trusted key"):
        signing.verify(json.dumps(bundle).encode(), trusted_keys=[keys["builder"][1]])


def test_forged_key_hint_is_refused(signed, tmp_path, keys):
    """An attacker signs with their own key and claims to be the trusted builder."""
    folder = Path(shutil.copytree(signed, tmp_path / "evil"))
    signing.sign(folder, key_path=keys["other"][0])
    bundle = _bundle(folder)
    bundle["verificationMaterial"]["publicKey"]["hint"] = signing.fingerprint(keys["builder"][1])
    forged = json.dumps(bundle).encode()
    assert signing.signer_hint(forged) == signing.fingerprint(keys["builder"][1])  # the hint is only a claim
    with pytest.raises(SignatureError, match="does not verify"):
        signing.verify(forged, trusted_keys=[keys["builder"][1]])


def test_flipped_signature_bytes_are_refused(signed, keys):
    bundle = _bundle(signed)
    sig = bytearray(base64.b64decode(bundle["dsseEnvelope"]["signatures"][0]["sig"]))
    sig[-1] ^= 1
    bundle["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(SignatureError, match="does not verify"):
        signing.verify(json.dumps(bundle).encode(), trusted_keys=[keys["builder"][1]])


@pytest.mark.parametrize("hashing", ["blake3-files", "sha256-shards"])
def test_signed_digests_other_than_sha256_per_file_are_refused(tmp_path, keys, hashing):
    """Validly signed by a trusted key with model-signing's other modes: not comparable with the manifest."""
    import model_signing

    folder = _artifact(tmp_path / "art")
    config = model_signing.hashing.Config()
    if hashing == "blake3-files":
        config.use_file_serialization(hashing_algorithm="blake3")
    else:
        config.use_shard_serialization(hashing_algorithm="sha256", shard_size=1024)
    (model_signing.signing.Config().use_elliptic_key_signer(private_key=keys["builder"][0])
     .set_hashing_config(config).sign(folder, folder / SIGNATURE))
    with pytest.raises(SignatureError, match="not one sha256 per file"):
        signing.verify(signing.read_signature(folder), trusted_keys=[keys["builder"][1]])


# --- hostile or broken signature files ----------------------------------------------------------------------

def test_unsigned_folder_has_no_signature(tmp_path):
    assert signing.read_signature(_artifact(tmp_path / "art")) is None


@pytest.mark.parametrize("data", [
    b"", b"garbage \x00\xff", b"[]", b"{}", b"null", b'{"mediaType": 1}', b"[" * 100_000,
    b'{"mediaType":"application/vnd.dev.sigstore.bundle.v0.3+json","verificationMaterial":{"publicKey":'
    b'{"hint":"ab"},"tlogEntries":[]},"dsseEnvelope":{"payload":"!!","payloadType":"x","signatures":[]}}',
], ids=["empty", "binary", "list", "object", "null", "wrong-type", "deep", "bad-fields"])
def test_malformed_signature_is_a_signature_error(keys, data):
    with pytest.raises(SignatureError):
        signing.verify(data, trusted_keys=[keys["builder"][1]])
    assert signing.signer_hint(data) is None


def test_truncated_signature_is_refused(signed, keys):
    data = signing.read_signature(signed)
    for n in (1, len(data) // 2, len(data) - 3):
        with pytest.raises(SignatureError):
            signing.verify(data[:n], trusted_keys=[keys["builder"][1]])


def test_empty_signature_list_is_refused(signed, keys):
    bundle = _bundle(signed)
    bundle["dsseEnvelope"]["signatures"] = []
    with pytest.raises(SignatureError, match="no valid model-signing payload"):
        signing.verify(json.dumps(bundle).encode(), trusted_keys=[keys["builder"][1]])


def test_missing_key_hint_is_refused(signed, keys):
    bundle = _bundle(signed)
    bundle["verificationMaterial"]["publicKey"] = {"hint": None}
    with pytest.raises(SignatureError, match="does not name its signing key"):
        signing.verify(json.dumps(bundle).encode(), trusted_keys=[keys["builder"][1]])


def test_huge_signature_file_is_refused(signed, keys):
    with open(signed / SIGNATURE, "wb") as f:
        f.truncate(signing.MAX_SIGNATURE_BYTES + 1)
    with pytest.raises(SignatureError, match="larger than"):
        signing.read_signature(signed)
    with pytest.raises(SignatureError, match="larger than"):
        signing.verify(b" " * (signing.MAX_SIGNATURE_BYTES + 1), trusted_keys=[keys["builder"][1]])


def test_signature_that_is_not_a_file_is_refused(tmp_path):
    folder = _artifact(tmp_path / "art")
    (folder / SIGNATURE).mkdir()
    with pytest.raises(SignatureError, match="not a regular file"):
        signing.read_signature(folder)
    (folder / SIGNATURE).rmdir()
    os.mkfifo(folder / SIGNATURE)  # must not block the loader waiting for a writer
    with pytest.raises(SignatureError, match="not a regular file"):
        signing.read_signature(folder)


# --- keys --------------------------------------------------------------------------------------------------

def test_fingerprint_is_stable(keys):
    public_path = keys["builder"][1]
    pem = public_path.read_bytes()
    key = serialization.load_pem_public_key(pem)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    values = {signing.fingerprint(public_path), signing.fingerprint(str(public_path)), signing.fingerprint(pem),
              signing.fingerprint(key), signing.fingerprint(serialization.load_der_public_key(der)),
              signing.fingerprint(pem.replace(b"\n", b"\r\n"))}
    assert values == {hashlib.sha256(pem).hexdigest()}
    assert signing.fingerprint(keys["other"][1]) not in values


def test_signer_hint_names_the_signing_key(signed, keys):
    assert signing.signer_hint(signing.read_signature(signed)) == signing.fingerprint(keys["builder"][1])


def test_trusted_key_paths_from_the_environment(monkeypatch, keys):
    value = os.pathsep.join([str(keys["builder"][1]), "", str(keys["other"][1])])
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, value)
    assert signing.trusted_key_paths() == [keys["builder"][1], keys["other"][1]]
    assert signing.trusted_key_paths("") == []
    assert len(signing.load_trusted_keys(signing.trusted_key_paths())) == 2


def test_no_trusted_keys_is_refused(signed):
    with pytest.raises(SignatureError, match="no trusted public keys"):
        signing.verify(signing.read_signature(signed), trusted_keys=[])


def _pem(key, private: bool = False) -> bytes:
    if private:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("kind, match", [
    ("missing", "cannot read trusted key"), ("garbage", "not a PEM public key"), ("private", "is a private key"),
    ("rsa", "not an elliptic-curve key"), ("secp256k1", "does not support"), ("folder", "cannot read trusted key"),
])
def test_bad_trusted_key_files(tmp_path, kind, match):
    path = tmp_path / "key.pub"
    if kind == "garbage":
        path.write_bytes(b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n")
    elif kind == "private":
        path.write_bytes(_pem(ec.generate_private_key(ec.SECP256R1()), private=True))
    elif kind == "rsa":
        path.write_bytes(_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    elif kind == "secp256k1":
        path.write_bytes(_pem(ec.generate_private_key(ec.SECP256K1())))
    elif kind == "folder":
        path.mkdir()
    with pytest.raises(SignatureError, match=match) as e:
        signing.load_trusted_keys([path])
    assert "\n" not in e.value.cause and e.value.hint


# --- signing refusals ----------------------------------------------------------------------------------------

def test_sign_refuses_a_folder_without_manifest(tmp_path, keys):
    (tmp_path / "model.pt2").write_bytes(b"x")
    with pytest.raises(SignatureError, match="no manifest.json"):
        signing.sign(tmp_path, key_path=keys["builder"][0])
    assert not (tmp_path / SIGNATURE).exists()


def test_sign_refuses_a_folder_that_does_not_match_its_manifest(tmp_path, keys):
    folder = _artifact(tmp_path / "art")
    (folder / "stray.bin").write_bytes(b"left over")
    with pytest.raises(SignatureError, match="does not match its manifest.json: the signature attests stray.bin"):
        signing.sign(folder, key_path=keys["builder"][0])
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FILES, "manifest.json", "stray.bin"])


@pytest.mark.parametrize("kind", ["public", "garbage", "rsa", "missing"])
def test_sign_refuses_a_bad_private_key(tmp_path, keys, kind):
    folder = _artifact(tmp_path / "art")
    key = tmp_path / "key.pem"
    if kind == "public":
        shutil.copy(keys["builder"][1], key)
    elif kind == "garbage":
        key.write_bytes(b"nope")
    elif kind == "rsa":
        key.write_bytes(_pem(rsa.generate_private_key(public_exponent=65537, key_size=1024), private=True))
    with pytest.raises(SignatureError) as e:
        signing.sign(folder, key_path=key)
    assert e.value.hint and not (folder / SIGNATURE).exists()


# --- the model-signing internals signing.py relies on (one place: _parse_bundle / _verified_manifest) -----------

def test_model_signing_internals_are_as_wrapped(keys):
    """Fails when a model-signing upgrade changes what _KeyVerifier, _key_signing_config and _verified_manifest
    depend on."""
    import inspect

    from model_signing._signing import sign_ec_key, sign_sigstore_pb, signing as ms_signing

    # sign_ec_key.Verifier keeps its key in _public_key (set from a path), which _KeyVerifier sets directly
    real = sign_ec_key.Verifier(Path(keys["builder"][1]))
    assert signing.fingerprint(real._public_key) == signing.fingerprint(keys["builder"][1])
    assert list(inspect.signature(sign_ec_key.Verifier.__init__).parameters) == ["self", "public_key_path"]
    assert callable(sign_ec_key._check_supported_ec_key)
    assert issubclass(sign_ec_key.Verifier, ms_signing.Verifier)
    # verify(Signature(bundle)) -> manifest.Manifest, from an in-memory bundle
    assert list(inspect.signature(ms_signing.Verifier.verify).parameters) == ["self", "signature"]
    assert list(inspect.signature(sign_sigstore_pb.Signature.__init__).parameters) == ["self", "bundle"]
    # the hint it writes is sha256 of the PEM SubjectPublicKeyInfo: signer_hint relies on it
    assert "hashlib.sha256(raw_bytes)" in inspect.getsource(sign_ec_key.Signer._get_verification_material)
    assert "Encoding.PEM" in inspect.getsource(sign_ec_key.Signer._get_verification_material)
    # _key_signing_config: sign_ec_key.Signer keeps its key in _private_key, Config keeps its signer in _signer
    import model_signing

    config = model_signing.signing.Config().use_elliptic_key_signer(private_key=keys["builder"][0])
    assert isinstance(config._signer, sign_ec_key.Signer)
    assert signing.fingerprint(config._signer._private_key.public_key()) == signing.fingerprint(keys["builder"][1])
    assert list(inspect.signature(sign_ec_key.Signer.__init__).parameters) == ["self", "private_key_path", "password"]
    assert "self._signer.sign(" in inspect.getsource(model_signing.signing.Config.sign)


# --- key files and the trusted-keys variable are untrusted input ------------------------------------------------

@pytest.mark.parametrize("value", ["", os.pathsep, "   ", f" {os.pathsep} "])
def test_t28_a_blank_trusted_keys_variable_is_an_error(monkeypatch, value):
    """Set but naming no key: before, it meant "no keys" and an unsigned artifact loaded."""
    from aotpack.errors import ConfigError
    from aotpack.serve.load import trusted_keys_from_env

    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, value)
    with pytest.raises(ConfigError, match="AOTPACK_TRUSTED_KEYS=.* names no key file") as e:
        trusted_keys_from_env()
    assert "\n" not in e.value.cause and "unset it" in e.value.hint
    monkeypatch.delenv(signing.TRUSTED_KEYS_ENV)
    assert trusted_keys_from_env() == []  # unset: no signature required


def test_t28_the_trusted_keys_variable_with_keys(monkeypatch, keys):
    from aotpack.serve.load import trusted_keys_from_env

    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, os.pathsep.join(["", str(keys["builder"][1]), " "]))
    assert [signing.fingerprint(k) for k in trusted_keys_from_env()] == [signing.fingerprint(keys["builder"][1])]


@pytest.fixture
def no_hang():
    """A read that blocks fails the test instead of hanging it."""
    import signal

    def _hung(*_):
        raise AssertionError("the key read blocked")

    old = signal.signal(signal.SIGALRM, _hung)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def _bad_key_file(tmp_path: Path, kind: str, keys) -> tuple[Path, str]:
    path = tmp_path / f"{kind}.key"
    if kind == "device":
        return Path("/dev/zero"), "a device, not a regular file"
    if kind == "fifo":
        os.mkfifo(path)
        return path, "a pipe, not a regular file"
    if kind == "huge":
        with open(path, "wb") as f:
            f.truncate(1 << 30)  # sparse: 1 GiB read would be the bug
        return path, "larger than 64 KiB"
    # two PEM keys in one file: the parsers silently used the first
    pair = keys["builder"][0] if kind == "two-private" else keys["builder"][1]
    other = keys["other"][0] if kind == "two-private" else keys["other"][1]
    path.write_bytes(pair.read_bytes() + other.read_bytes())
    return path, "holds 2 PEM keys; a key file holds exactly one"


@pytest.mark.parametrize("kind", ["device", "fifo", "huge", "two-public"])
def test_t29_a_trusted_key_file_is_read_bounded(tmp_path, keys, kind, no_hang, monkeypatch):
    path, match = _bad_key_file(tmp_path, kind, keys)
    with pytest.raises(SignatureError, match=match) as e:
        signing.load_trusted_keys([path])
    assert "\n" not in e.value.cause and e.value.hint
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, str(path))  # what a load reads
    from aotpack.serve.load import trusted_keys_from_env

    with pytest.raises(SignatureError, match=match):
        trusted_keys_from_env()


@pytest.mark.parametrize("kind", ["device", "fifo", "huge", "two-private"])
def test_t29_a_signing_key_file_is_read_bounded(tmp_path, keys, kind, no_hang):
    """sign --key and build --sign-key (checked before the build starts) read it through the same reader."""
    from aotpack.builder.spec import resolve

    path, match = _bad_key_file(tmp_path, kind, keys)
    folder = _artifact(tmp_path / "art")
    with pytest.raises(SignatureError, match=match) as e:
        signing.sign(folder, key_path=path)
    assert "\n" not in e.value.cause and e.value.hint and not (folder / SIGNATURE).exists()
    with pytest.raises(SignatureError, match=match):
        resolve("tiny-flux", "int8wo", out=tmp_path / "out", sign_key=path)


def test_t29_a_key_written_by_openssl_ecparam_still_signs(tmp_path, keys):
    """``openssl ecparam -genkey`` without -noout writes an EC PARAMETERS block before the key: one key."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "key.pem"
    pem.write_bytes(b"-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n"
                    + key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption()))
    info = signing.sign(_artifact(tmp_path / "art"), key_path=pem)
    assert info.fingerprint == signing.fingerprint(key.public_key())


def test_t29_sign_reads_the_key_file_once(tmp_path, keys, monkeypatch):
    """model-signing's own signer would read the path again (unbounded, and maybe another file by then)."""
    from model_signing._signing import sign_ec_key

    def _reads_again(*_a, **_k):
        raise AssertionError("model-signing read the key path")

    monkeypatch.setattr(sign_ec_key.Signer, "__init__", _reads_again)
    folder = _artifact(tmp_path / "art")
    info = signing.sign(folder, key_path=keys["builder"][0])
    assert info.fingerprint == signing.fingerprint(keys["builder"][1])
    assert _load_check(folder, [keys["builder"][1]]).fingerprint == info.fingerprint
