"""Node identity: one ed25519 key on disk, the peer id derived from it, and signatures.

The key file holds the libp2p protobuf encoding of the private key (the same bytes that
`libp2p.identity_utils.save_identity` writes), so other libp2p tools can read it. It is
written atomically (temp file + rename) with mode 0600, and a file that other users can
read, or that does not hold an ed25519 key, is refused with an `IdentityError`: a node
never runs on a key it cannot trust to be its own.

Public keys travel as `keypair.public_key.serialize()` (libp2p protobuf encoding); the
helpers at the bottom verify signatures and derive peer ids from those bytes, so other
modules (envelope signing) never import libp2p themselves.

This module must never generate a key silently when a key file exists but is unreadable.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.serialization import deserialize_private_key, deserialize_public_key
from libp2p.peer.id import ID

__all__ = [
    "IdentityError",
    "KeyPair",
    "keygen",
    "load_identity",
    "load_or_create_identity",
    "peer_id_from_public_key",
    "peer_id_of",
    "sign",
    "verify_signature",
]

_KEY_FILE_MODE = 0o600


class IdentityError(Exception):
    """The identity file is missing, unsafe or malformed; the message says what to do."""


def _write_key_file(path: Path, keypair: KeyPair) -> None:
    """Write the private key to `path` atomically, readable only by this user."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _KEY_FILE_MODE)  # mkstemp already uses 0600; be explicit
        with os.fdopen(fd, "wb") as f:
            f.write(keypair.private_key.serialize())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def load_identity(path: str | os.PathLike[str]) -> KeyPair:
    """Read the ed25519 key at `path`; raise IdentityError if it is unsafe or malformed."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IdentityError(
            f"identity file {path} does not exist; create one with `rollshare keygen`"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError(f"identity file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise IdentityError(
            f"identity file {path} has mode {stat.S_IMODE(st.st_mode):04o}; other users "
            f"could read your private key. Run `chmod 600 {path}` (or make a new key)"
        )
    data = path.read_bytes()
    try:
        private_key = deserialize_private_key(data)
    except Exception as e:
        raise IdentityError(
            f"identity file {path} does not hold a libp2p private key ({e}); "
            f"restore it from a backup or create a new one with `rollshare keygen --force`"
        ) from None
    if private_key.get_type() != KeyType.Ed25519:
        raise IdentityError(
            f"identity file {path} holds a {private_key.get_type().name} key; rollshare "
            f"needs ed25519: create one with `rollshare keygen --force`"
        )
    return KeyPair(private_key, private_key.get_public_key())


def keygen(path: str | os.PathLike[str], force: bool = False) -> KeyPair:
    """Create a new ed25519 identity at `path`; refuse to overwrite unless `force`."""
    path = Path(path)
    if path.exists() and not force:
        raise IdentityError(
            f"identity file {path} already exists (peer id "
            f"{_peer_id_of_file(path)}); pass force=True / --force to replace it"
        )
    keypair = create_new_key_pair()
    _write_key_file(path, keypair)
    return keypair


def _peer_id_of_file(path: Path) -> str:
    try:
        return peer_id_of(load_identity(path))
    except IdentityError:
        return "unreadable"


def load_or_create_identity(path: str | os.PathLike[str]) -> KeyPair:
    """Load the identity at `path`, creating it on first start. Same peer id on every run."""
    path = Path(path)
    if not path.exists():
        return keygen(path)
    return load_identity(path)


def peer_id_of(keypair: KeyPair) -> str:
    """The base58 peer id ("12D3KooW...") of a keypair."""
    return ID.from_pubkey(keypair.public_key).to_base58()


def sign(keypair: KeyPair, data: bytes) -> bytes:
    """Sign `data` with the node's private key (64-byte ed25519 signature)."""
    return keypair.private_key.sign(data)


def verify_signature(public_key_bytes: bytes, data: bytes, sig: bytes) -> bool:
    """True if `sig` is a valid signature of `data` by the protobuf-encoded public key.

    Never raises: malformed keys or signatures are simply invalid.
    """
    try:
        return bool(deserialize_public_key(public_key_bytes).verify(data, sig))
    except Exception:
        return False


#: libp2p protobuf encoding of an ed25519 public key: key_type=1 (field 1), 32-byte data (field 2)
_ED25519_KEY_PREFIX = b"\x08\x01\x12\x20"


def is_ed25519_public_key(data: bytes) -> bool:
    """Whether `data` is an ed25519 public key in the canonical libp2p encoding (36 bytes).

    Checked on the raw bytes before anything parses them: no RSA keys of attacker-chosen size.
    """
    return len(data) == len(_ED25519_KEY_PREFIX) + 32 and data.startswith(_ED25519_KEY_PREFIX)


def peer_id_from_public_key(public_key_bytes: bytes) -> str:
    """The base58 peer id of a protobuf-encoded public key; ValueError if malformed."""
    try:
        public_key = deserialize_public_key(public_key_bytes)
    except Exception as e:
        raise ValueError(f"not a libp2p public key ({e})") from None
    return ID.from_pubkey(public_key).to_base58()
