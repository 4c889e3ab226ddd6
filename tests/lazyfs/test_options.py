"""Mount options on their way to the mount daemon: `MountOptions.to_argv` and the
daemon's parser give back every setting as it was given (the daemon is started with
`python -m` or forked from the zygote: either way its settings are its arguments)."""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace

from peerstar.lazyfs.mountd import build_parser
from peerstar.lazyfs.options import CacheOptions, FetchOptions, MountOptions, PrefetchOptions

PLACES = ["--url", "http://127.0.0.1:1/v2/r/blobs/sha256:" + "a" * 64,
          "--digest", "sha256:" + "a" * 64, "--mountpoint", "/m", "--cache-dir", "/c"]

# Every setting differs from its default, so a setting that is not passed on fails.
CHANGED = MountOptions(
    fetch=FetchOptions(region_size=4096, request_timeout=7.5, retries=0,
                       ca_file="/etc/peerstar/ca.pem"),
    cache=CacheOptions(region_bytes=0, chunk_bytes=1 << 20),
    prefetch=PrefetchOptions(timeout=2.5, wait=True, size=123, background=False,
                             background_idle=0.5),
    verify=False, debug=True, cgroup="/sys/fs/cgroup/peerstar-mounts")


def _leaves(obj: object, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if is_dataclass(value):
            out.update(_leaves(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = value
    return out


def _through_the_daemon_parser(opts: MountOptions) -> MountOptions:
    return MountOptions.from_args(build_parser().parse_args([*PLACES, *opts.to_argv()]))


def test_changed_options_reach_the_daemon_as_given() -> None:
    default, changed = _leaves(MountOptions()), _leaves(CHANGED)
    same = sorted(k for k in default if default[k] == changed[k])
    assert same == ["open_timeout"]  # the starter's wait: not the daemon's business
    assert _through_the_daemon_parser(CHANGED) == CHANGED


def test_default_options_reach_the_daemon_as_given() -> None:
    assert _through_the_daemon_parser(MountOptions()) == MountOptions()
    # and the daemon's own defaults are the options' defaults
    assert MountOptions.from_args(build_parser().parse_args(PLACES)) == MountOptions()


def test_open_timeout_is_not_passed_on() -> None:
    assert replace(MountOptions(), open_timeout=1.0).to_argv() == MountOptions().to_argv()
