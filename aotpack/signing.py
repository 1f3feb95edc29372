"""Signed artifacts: OpenSSF model-signing with elliptic keys, offline.

``sign`` writes ``signature.sig`` into a finished artifact folder: a Sigstore bundle whose DSSE envelope holds an
in-toto statement listing the sha256 of every file of the folder (manifest.json included, the signature itself
excluded). A serving box that requires a known builder calls ``verify`` on the signature bytes it read: that
checks the ECDSA signature against its trusted public keys and returns the attested digests *without reading the
artifact's files*. The loader then calls ``check_covers`` with the sha256 of the manifest bytes it holds and the
manifest's file hashes, which it checks against the bytes it actually opens. So every file is read once, and
what is signed is what is loaded.

model-signing's public verifier hashes the folder again by path (a second read, and a second pass over GBs of
weights); the one step it has no public API for, checking a bundle with a key object and returning its payload,
is wrapped in ``_KeyVerifier`` / ``_verified_manifest`` below, and tests/test_signing.py fails if it changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

from aotpack.artifact.manifest import MANIFEST
from aotpack.errors import ConfigError, SignatureError, first_line, one_line

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

    from aotpack.artifact.manifest import Manifest

SIGNATURE = "signature.sig"
TRUSTED_KEYS_ENV = "AOTPACK_TRUSTED_KEYS"
# A bundle holds ~150 bytes per file: 4 MiB is tens of thousands of files, and bounds what a hostile one costs.
MAX_SIGNATURE_BYTES = 4 << 20
# A PEM key is a few hundred bytes (an RSA-16384 one is 13 KB): more is not a key, and must not be read on.
_MAX_KEY_BYTES = 64 << 10
_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----")
_SUPPORTED_CURVES = ("secp256r1", "secp384r1", "secp521r1")  # what model-signing (Sigstore's specs) accepts
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEYGEN_HINT = ("make a key pair with: openssl ecparam -genkey -name prime256v1 -noout -out key.pem && "
                "openssl ec -in key.pem -pubout -out key.pub")

KeyLike = Union[str, os.PathLike, bytes, "EllipticCurvePublicKey"]


@dataclass(frozen=True)
class SignatureInfo:
    """What ``sign`` wrote: the signature file, the signing key's fingerprint and the digests it attests."""

    path: Path
    fingerprint: str
    digests: dict[str, str]


@dataclass(frozen=True)
class SignedContents:
    """What a verified signature attests: relative file name -> sha256 hex, and the key that signed it."""

    digests: dict[str, str]
    fingerprint: str


# --- keys ------------------------------------------------------------------------------------------------

def fingerprint(public_key: KeyLike) -> str:
    """sha256 hex of the key's PEM SubjectPublicKeyInfo: the same value model-signing writes as the bundle's
    public-key hint, so ``signer_hint`` can be compared with it. Accepts a key object, PEM bytes or a path."""
    from cryptography.hazmat.primitives import serialization

    key = _public_key(public_key)
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def trusted_key_paths(value: str | None = None) -> list[Path]:
    """The key paths in ``value`` (default: the ``AOTPACK_TRUSTED_KEYS`` variable), separated by os.pathsep."""
    if value is None:
        value = os.environ.get(TRUSTED_KEYS_ENV, "")
    return [Path(p) for p in value.split(os.pathsep) if p.strip()]


def trusted_keys_from_env() -> list[EllipticCurvePublicKey]:
    """The keys ``AOTPACK_TRUSTED_KEYS`` names; [] when it is unset. Set, it must name at least one key file:
    a blank value (``''``, ``':'``, spaces) is an error, never a silent "no signature required"."""
    value = os.environ.get(TRUSTED_KEYS_ENV)
    if value is None:
        return []
    paths = trusted_key_paths(value)
    if not paths:
        raise ConfigError(f"{TRUSTED_KEYS_ENV}={one_line(repr(value), 40)} names no key file",
                          f"set it to PEM public key paths separated by '{os.pathsep}', or unset it to load "
                          "unsigned artifacts")
    return load_trusted_keys(paths)


def load_trusted_keys(paths: Sequence[str | os.PathLike]) -> list[EllipticCurvePublicKey]:
    """Read PEM elliptic-curve public keys (P-256, P-384 or P-521), exactly one per file."""
    hint = f"check the paths in --trusted-key / {TRUSTED_KEYS_ENV}"
    return [_public_key(read_key_file(path, what="trusted key", hint=hint), where=str(path)) for path in paths]


def read_key_file(path: str | os.PathLike, *, what: str, hint: str) -> bytes:
    """The bytes of the key file ``path``: a regular file of at most 64 KiB holding one PEM key, or SignatureError.

    Opened without blocking (a FIFO must not hang a load) and checked on the open descriptor (no swap between the
    check and the read). Symlinks are followed: the user named the path, and key files are often links (a
    Kubernetes secret mount is one); what the link reaches must still be a regular file.
    """
    shown = f"{what} {one_line(str(path), 200)}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise SignatureError(f"cannot read {shown}: {e.strerror or e}", hint) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a pipe" if stat.S_ISFIFO(st.st_mode) else \
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a special file"
            raise SignatureError(f"cannot read {shown}: {kind}, not a regular file", hint)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        data = f.read(_MAX_KEY_BYTES + 1)  # a file that grows after the fstat is still cut here
    if len(data) > _MAX_KEY_BYTES:
        raise SignatureError(f"{shown} is larger than {_MAX_KEY_BYTES >> 10} KiB: not a PEM key", hint)
    _one_pem_key(data, shown)
    return data


def _one_pem_key(data: bytes, where: str) -> None:
    """Refuse a file holding more than one PEM key: the parsers silently take the first, so the file would not
    mean what it seems to (an 'EC PARAMETERS' block, which openssl ecparam writes before the key, is no key)."""
    labels = [m.group(1) for m in _PEM_BEGIN.finditer(data) if m.group(1) != b"EC PARAMETERS"]
    if len(labels) > 1:
        raise SignatureError(f"{where} holds {len(labels)} PEM keys; a key file holds exactly one",
                             "put each key in a file of its own (several trusted keys: list every file)")


def load_private_key(path: str | os.PathLike, password: str | None = None):
    """The EC private key (P-256, P-384 or P-521) in the PEM file ``path``, read with ``read_key_file``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = read_key_file(path, what="signing key", hint=_KEYGEN_HINT)
    shown = one_line(str(path), 200)
    try:
        private = serialization.load_pem_private_key(data, password.encode() if password is not None else None)
    except (ValueError, TypeError) as e:  # garbage, wrong or missing password, unsupported format
        kind = "an unencrypted" if password is None else "a usable"
        raise SignatureError(f"{shown} is not {kind} PEM private key ({first_line(e, 120)})", _KEYGEN_HINT) from None
    except Exception as e:  # UnsupportedAlgorithm and the like: not a key this can sign with
        raise SignatureError(f"{shown} is not a usable PEM private key ({first_line(e, 120)})",
                             _KEYGEN_HINT) from None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise SignatureError(f"{shown} is not an elliptic-curve private key", _KEYGEN_HINT)
    _public_key(private.public_key(), where=shown)  # a curve model-signing supports
    return private


def _public_key(key: KeyLike, where: str | None = None) -> EllipticCurvePublicKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if isinstance(key, (str, os.PathLike)):
        return load_trusted_keys([key])[0]
    if isinstance(key, ec.EllipticCurvePublicKey):
        public = key
    else:
        where = where or "trusted key"
        if not isinstance(key, bytes) or len(key) > _MAX_KEY_BYTES:
            raise SignatureError(f"{where} is not a PEM public key", _KEYGEN_HINT)
        _one_pem_key(key, where)
        if b"PRIVATE KEY" in key:
            raise SignatureError(f"{where} is a private key",
                                 "give serving boxes the public key only: openssl ec -in key.pem -pubout -out key.pub")
        try:
            public = serialization.load_pem_public_key(key)
        except Exception as e:  # ValueError, UnsupportedAlgorithm, ...: all mean "not a key we can use"
            raise SignatureError(f"{where} is not a PEM public key ({first_line(e, 120)})", _KEYGEN_HINT) from None
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise SignatureError(f"{where} is a {type(public).__name__.lstrip('_')}, not an elliptic-curve key",
                                 _KEYGEN_HINT)
    if public.curve.name not in _SUPPORTED_CURVES:
        raise SignatureError(f"{where or 'key'} uses curve {public.curve.name}, which model-signing does not support",
                             "use P-256, P-384 or P-521 (" + _KEYGEN_HINT + ")")
    return public


# --- signing ---------------------------------------------------------------------------------------------

def sign(folder: str | os.PathLike, *, key_path: str | os.PathLike, password: str | None = None) -> SignatureInfo:
    """Sign every file of a finished artifact folder (manifest.json included) with an EC private key (PEM).

    Writes ``folder/signature.sig`` atomically (a temp file renamed into place), replacing an older one. Before
    renaming, the new signature is verified with the key's public half and checked against manifest.json exactly
    as a loader would, so a folder holding a stray or changed file is refused here rather than on every box.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise SignatureError(f"{folder} has no {MANIFEST}: not a finished artifact",
                             "sign the folder that 'aotpack build' wrote")
    private = load_private_key(key_path, password)
    public = private.public_key()

    import model_signing

    # The file serialization with sha256 records each file's plain sha256, the same value as manifest.json's.
    # git paths are signed like any other file: nothing in the folder escapes the signature but the signature.
    hashing = (model_signing.hashing.Config()
               .use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
               .set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False))
    # signed with the key object read above: model-signing's own signer would read the path again, unbounded
    config = _key_signing_config(private).set_hashing_config(hashing)
    # Named, not created, before hashing: model-signing writes it after it has hashed the folder.
    tmp = folder / f".{SIGNATURE}.{secrets.token_hex(8)}.tmp"
    try:
        try:
            config.sign(folder, tmp)
        except (OSError, ValueError) as e:  # a symlink, special file or unreadable file in the folder
            raise SignatureError(f"cannot sign {folder}: {first_line(e, 200)}",
                                 "sign a plain artifact folder (regular files only)") from None
        data = tmp.read_bytes()
        signed = verify(data, trusted_keys=[public])
        manifest_bytes = (folder / MANIFEST).read_bytes()
        try:
            check_covers(signed, manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
                         files=_manifest_hashes(manifest_bytes))
        except SignatureError as e:
            raise SignatureError(f"{folder} does not match its {MANIFEST}: {e.cause}",
                                 "remove stray files or rebuild the artifact, then sign again") from None
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, folder / SIGNATURE)
    finally:
        tmp.unlink(missing_ok=True)
    return SignatureInfo(path=folder / SIGNATURE, fingerprint=signed.fingerprint, digests=signed.digests)


def _manifest_hashes(data: bytes) -> dict[str, str]:
    """name -> sha256 from manifest.json's ``files`` (only that part: the schema is manifest.py's business)."""
    try:
        files = json.loads(data)["files"]
        return {name: entry["sha256"] for name, entry in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SignatureError(f"{MANIFEST} has no readable 'files' table", "rebuild the artifact") from None


# --- reading and verifying -------------------------------------------------------------------------------

def read_signature(folder: str | os.PathLike) -> bytes | None:
    """The bytes of ``folder/signature.sig``, or None when the folder is not signed.

    Refuses (SignatureError) anything but a regular file of at most MAX_SIGNATURE_BYTES: a FIFO or device
    planted under that name must not block or flood the loader.
    """
    path = Path(folder) / SIGNATURE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SignatureError(f"cannot read {path}: {e.strerror or e}", "download the artifact again") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SignatureError(f"{path} is not a regular file", "download the artifact again; do not load it")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        data = f.read(MAX_SIGNATURE_BYTES + 1)
    if len(data) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"{path} is larger than {MAX_SIGNATURE_BYTES >> 20} MiB: not an aotpack signature",
                             "download the artifact again; do not load it")
    return data


def signer_hint(signature_bytes: bytes) -> str | None:
    """The fingerprint of the key the signature *claims* to be from, without verifying anything.

    model-signing stores it unauthenticated in the bundle (verificationMaterial.publicKey.hint); only ``verify``
    proves it. None when the bytes are not a bundle or carry no hint. Never raises.
    """
    try:
        bundle = _parse_bundle(signature_bytes)
        hint = bundle.verification_material.public_key.hint
    except Exception:  # inspect shows "signed by ?" for anything it cannot read
        return None
    return hint if isinstance(hint, str) and _HEX64.match(hint) else None


def verify(signature_bytes: bytes, *, trusted_keys: Sequence[KeyLike]) -> SignedContents:
    """Check the signature against the trusted public keys and return the file digests it attests.

    Reads no artifact file: the caller compares the result with what it hashed, using ``check_covers``.
    ``trusted_keys`` are key objects (``load_trusted_keys``), PEM bytes or paths.
    """
    keys = [_public_key(k) for k in trusted_keys]
    if not keys:
        raise SignatureError("no trusted public keys to verify the signature with",
                             f"pass --trusted-key or set {TRUSTED_KEYS_ENV}")
    bundle = _parse_bundle(signature_bytes)
    claimed = bundle.verification_material.public_key.hint if bundle.verification_material.public_key else None
    if not claimed:
        # model-signing < 1.0 bundles carry no hint (and its verifier would print a warning to stdout)
        raise SignatureError("signature does not name its signing key (old model-signing format)",
                             "sign the artifact again with 'aotpack sign'")
    by_fingerprint = {fingerprint(k): k for k in keys}
    if claimed not in by_fingerprint:
        shown = claimed[:64] if isinstance(claimed, str) else "?"
        raise SignatureError(f"not signed by any trusted key (it names key {shown})",
                             f"add the builder's public key to --trusted-key / {TRUSTED_KEYS_ENV}, "
                             "or do not load this artifact")
    digests = _verified_manifest(bundle, by_fingerprint[claimed])
    return SignedContents(digests=digests, fingerprint=claimed)


def check_covers(signed: SignedContents, *, manifest_sha256: str, files: dict[str, str]) -> None:
    """Require the signature to attest exactly manifest.json (with ``manifest_sha256``, the hash of the manifest
    bytes the caller holds) and every file in ``files`` (name -> sha256, from that manifest), nothing else."""
    hint = "the artifact changed after it was signed: download it again; do not load it"
    expected = {MANIFEST: manifest_sha256, **{n: files[n] for n in sorted(files)}}
    for name, sha in expected.items():
        if name == SIGNATURE:
            raise SignatureError(f"the manifest lists {SIGNATURE}, which cannot sign itself",
                                 "sign after the manifest is written")
        got = signed.digests.get(name)
        if got is None:
            raise SignatureError(f"{name} is not covered by the signature", hint)
        if got.lower() != str(sha).lower():
            raise SignatureError(f"{name} differs from the signed file", hint)
    for name in sorted(set(signed.digests) - set(expected)):
        raise SignatureError(f"the signature attests {name}, which the manifest does not list", hint)


# --- the model-signing internals we rely on, in one place --------------------------------------------------

def _parse_bundle(signature_bytes: bytes):
    """The Sigstore bundle (sigstore_models' pydantic model) in the bytes, or SignatureError. Not verified."""
    from sigstore_models.bundle.v1 import Bundle

    if not isinstance(signature_bytes, (bytes, bytearray)):
        raise SignatureError("signature must be bytes", "pass the bytes read_signature returned")
    if len(signature_bytes) > MAX_SIGNATURE_BYTES:
        raise SignatureError(f"signature is larger than {MAX_SIGNATURE_BYTES >> 20} MiB", "do not load this artifact")
    try:
        bundle = Bundle.from_json(bytes(signature_bytes))
    except Exception as e:  # pydantic ValidationError for bad JSON, shape or base64; anything else alike
        raise SignatureError(f"{SIGNATURE} is not a model-signing bundle ({first_line(e, 120)})",
                             "download the artifact again; do not load it") from None
    if bundle.dsse_envelope is None or bundle.verification_material.public_key is None:
        raise SignatureError(f"{SIGNATURE} is not an elliptic-key model-signing bundle",
                             "sign the artifact with 'aotpack sign'")
    return bundle


def _key_signing_config(private_key):
    """model-signing's signing.Config with its EC-key signer built from a key object, not a path (its __init__
    reads the file again, with no size limit, and could read another file than the one checked)."""
    import model_signing
    from model_signing._signing import sign_ec_key

    class _KeySigner(sign_ec_key.Signer):
        def __init__(self, key) -> None:  # the state sign_ec_key.Signer.__init__ sets
            sign_ec_key._check_supported_ec_key(key.public_key())
            self._private_key = key

    config = model_signing.signing.Config()
    config._signer = _KeySigner(private_key)  # what use_elliptic_key_signer sets
    return config


def _key_verifier_class():
    from model_signing._signing import sign_ec_key

    class _KeyVerifier(sign_ec_key.Verifier):
        """model-signing's EC-key verifier, built from a key object instead of a path (its __init__ reads one)."""

        def __init__(self, public_key) -> None:  # the state sign_ec_key.Verifier.__init__ sets
            sign_ec_key._check_supported_ec_key(public_key)
            self._public_key = public_key

    return _KeyVerifier


def _verified_manifest(bundle, public_key) -> dict[str, str]:
    """Verify the DSSE signature with ``public_key`` and return the in-toto payload's file -> sha256 table.

    Uses model-signing's Verifier.verify (media type, ECDSA over the DSSE PAE, in-toto statement type,
    predicate type, root digest over the resources) without the folder hashing of verifying.Config.verify.
    """
    from cryptography.exceptions import InvalidSignature
    from model_signing._signing import sign_sigstore_pb

    try:
        manifest = _key_verifier_class()(public_key).verify(sign_sigstore_pb.Signature(bundle))
    except InvalidSignature:
        raise SignatureError(f"{SIGNATURE} does not verify with trusted key {fingerprint(public_key)[:16]}... "
                             "(tampered or corrupted)", "download the artifact again; do not load it") from None
    except Exception as e:  # a signed but malformed payload: ValueError, KeyError, TypeError, IndexError...
        raise SignatureError(f"{SIGNATURE} holds no valid model-signing payload ({first_line(e, 120)})",
                             "sign the artifact again with 'aotpack sign'") from None
    kind = manifest.serialization_type
    if kind.get("method") != "files" or kind.get("hash_type") != "sha256":
        raise SignatureError(f"{SIGNATURE} attests {kind.get('method')}/{kind.get('hash_type')} digests, "
                             "not one sha256 per file", "sign the artifact again with 'aotpack sign'")
    digests = {}
    for item in manifest.resource_descriptors():
        if item.digest.algorithm != "sha256":
            raise SignatureError(f"{SIGNATURE} attests {item.identifier} with {item.digest.algorithm}, not sha256",
                                 "sign the artifact again with 'aotpack sign'")
        digests[item.identifier] = item.digest.digest_hex
    return digests


def check_signature(signature: bytes | None, manifest_bytes: bytes, manifest: "Manifest", trusted_keys: Sequence,
                    where: Path) -> str:
    """Require a signature from one of ``trusted_keys`` over exactly these manifest bytes and the files they
    list; returns the signing key's fingerprint."""
    from aotpack.artifact import manifest as mf

    if signature is None:
        raise SignatureError(f"{one_line(str(where))} is not signed, and trusted keys are required",
                             "sign it with 'aotpack sign DIR --key KEY.pem', or load it without "
                             "--trusted-key / AOTPACK_TRUSTED_KEYS")
    signed = verify(signature, trusted_keys=list(trusted_keys))
    check_covers(signed, manifest_sha256=mf.sha256(manifest_bytes),
                 files={name: e.sha256 for name, e in manifest.files.items()})
    return signed.fingerprint
