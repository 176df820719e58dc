import hashlib
import importlib.metadata
import platform

from offset_cir import hashing, stamps


def test_file_sha256_equals_hashlib_over_several_blocks(tmp_path):
    data = bytes(range(256)) * 9000  # 2.3 MB: more than two of the 1 MiB read blocks
    path = tmp_path / "blob.bin"
    path.write_bytes(data)
    assert hashing.file_sha256(path) == hashlib.sha256(data).hexdigest()
    # the published test vector of SHA-256("abc")
    assert hashing.bytes_sha256(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_tagged_form():
    assert hashing.tagged("ab12") == "sha256:ab12"
    assert hashing.tagged("sha256:ab12") == "sha256:ab12"
    assert hashing.is_tagged("sha256:ab12") and not hashing.is_tagged("ab12") and not hashing.is_tagged(None)


def test_environment_stamp_names_installed_and_missing_packages():
    env = stamps.environment("no-such-distribution-xyz")
    assert env["python"] == platform.python_version()
    assert env["torch"] == importlib.metadata.version("torch")
    assert env["offset-cir"] == importlib.metadata.version("offset-cir")
    assert env["no-such-distribution-xyz"] is None
    assert set(stamps.CORE_PACKAGES) <= set(env)
