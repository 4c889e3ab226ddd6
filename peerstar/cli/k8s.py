"""`peerstar swarm-key` and `peerstar k8s ...`: a private swarm on Kubernetes.

Owns the command line of the deployment: a new swarm key (replacing the external
`ipfs-swarm-key-gen`), the bootstrap Secret, the manifests, the containerd snippet, and
`k8s kubo-config`, which the pods' init container runs to set up the kubo repo.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from peerstar.errors import PeerstarError
from peerstar.k8s import hosts, keys, kubo, manifests
from peerstar.localfile import atomic_write
from peerstar.registry.origin import MirrorUpstream, parse_mirror

_DNS_LABEL = re.compile(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")
_DNS_NAME = re.compile(r"\A[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")
# kubo parses StorageMax with go-humanize: a number and an optional SI or IEC unit.
_STORAGE = re.compile(r"\A[0-9]+(\.[0-9]+)?\s*([kKMGTPE]i?B|B)?\Z")
_PEER_ID = re.compile(r"\A(12D3KooW|Qm)[1-9A-HJ-NP-Za-km-z]{20,60}\Z")


def _namespace(value: str) -> str:
    if not _DNS_LABEL.match(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a valid namespace (lower-case letters, digits, '-', at most 63)")
    return value


def _storage(value: str) -> str:
    if not _STORAGE.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a size such as 50GB or 200GiB")
    return value


def _image(value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise argparse.ArgumentTypeError(f"{value!r} is not an image reference")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("swarm-key", help="print a new private-network key (swarm.key)")
    p.add_argument("-o", "--output", type=Path,
                   help="write it to this new file (mode 0400) instead of stdout")
    p.set_defaults(func=cmd_swarm_key)

    k8s = sub.add_parser("k8s", help="Kubernetes deployment: bootstrap Secret, manifests")
    ks = k8s.add_subparsers(dest="k8s_command", metavar="COMMAND")
    k8s.set_defaults(func=lambda args: (k8s.print_help(), 2)[1])

    def ns_arg(q: argparse.ArgumentParser) -> None:
        q.add_argument("-n", "--namespace", type=_namespace, default=manifests.DEFAULT_NAMESPACE,
                       help=f"namespace (default {manifests.DEFAULT_NAMESPACE})")

    b = ks.add_parser("bootstrap", help="print the Secret with a fresh swarm key and the "
                      "bootstrap peer's identity (apply it once per cluster)")
    ns_arg(b)
    b.set_defaults(func=cmd_bootstrap)

    m = ks.add_parser("manifests", help="print the bootstrap peer and the per-node DaemonSet")
    ns_arg(m)
    m.add_argument("--kubo-image", type=_image, default=manifests.DEFAULT_KUBO_IMAGE,
                   help=f"kubo image (default {manifests.DEFAULT_KUBO_IMAGE})")
    m.add_argument("--peerstar-image", type=_image, default=manifests.DEFAULT_PEERSTAR_IMAGE,
                   help=f"peerstar image (default {manifests.DEFAULT_PEERSTAR_IMAGE})")
    m.add_argument("--storage-max", type=_storage, default=manifests.DEFAULT_STORAGE_MAX,
                   help=f"kubo Datastore.StorageMax per node (default "
                        f"{manifests.DEFAULT_STORAGE_MAX})")
    m.add_argument("--mirror", action="append", default=[], metavar="[NS=]URL",
                   help="make each node's bridge the cluster's mirror of this upstream "
                        "registry (repeatable; see docs/mirror.md)")
    m.set_defaults(func=cmd_manifests)

    c = ks.add_parser("containerd-config", help="print the containerd config.toml snippet "
                      "each node needs (proxy plugin + CRI runtime with the peerstar snapshotter)")
    c.add_argument("--socket", default=manifests.SNAPSHOTTER_SOCKET,
                   help=f"snapshotter socket (default {manifests.SNAPSHOTTER_SOCKET})")
    c.add_argument("--cgroupfs", action="store_true",
                   help="the kubelet uses the cgroupfs cgroup driver (default: systemd)")
    c.add_argument("--mirror", action="append", default=[], metavar="[NS=]URL",
                   help="pull this upstream's images through the node's bridge (repeatable): "
                        "adds config_path and prints each registry's hosts.toml")
    c.add_argument("--bridge", default=hosts.DEFAULT_BRIDGE,
                   help=f"the node's bridge as containerd reaches it (default "
                        f"{hosts.DEFAULT_BRIDGE})")
    c.add_argument("--config-path", default=hosts.CONFIG_PATH,
                   help=f"containerd's registry config_path (default {hosts.CONFIG_PATH})")
    c.add_argument("--hosts-dir", type=Path,
                   help="also write the hosts.toml files under DIR (DIR/<registry>/hosts.toml)")
    c.set_defaults(func=cmd_containerd_config)

    kc = ks.add_parser("kind-config", help="print a kind cluster config with that containerd "
                       "config on every node")
    kc.add_argument("--workers", type=int, default=2, help="worker nodes (default 2)")
    kc.set_defaults(func=cmd_kind_config)

    k = ks.add_parser("kubo-config", help="(init container) set up an initialised kubo repo "
                      "for the private swarm")
    k.add_argument("--repo", type=Path, default=Path(os.environ.get("IPFS_PATH", "~/.ipfs")),
                   help="kubo repo (default $IPFS_PATH)")
    k.add_argument("--storage-max", type=_storage, help="Datastore.StorageMax")
    k.add_argument("--bootstrap-host", help="DNS name of the bootstrap peer")
    k.add_argument("--bootstrap-peer-id", help="peer id of the bootstrap peer")
    k.add_argument("--identity-file", type=Path,
                   help="file with a base64 libp2p private key to use as this peer's identity")
    k.set_defaults(func=cmd_kubo_config)


def cmd_swarm_key(args: argparse.Namespace) -> int:
    key = keys.generate_swarm_key()
    if args.output is None:
        sys.stdout.write(key)
        return 0
    try:
        # O_EXCL: never overwrite a key a swarm already uses; 0400 from the first byte.
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
    except FileExistsError:
        raise PeerstarError(f"{args.output} exists: refusing to replace a swarm key") from None
    except OSError as exc:
        raise PeerstarError(f"cannot create {args.output}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    secret = manifests.bootstrap_secret(args.namespace)
    sys.stdout.write(manifests.to_yaml([secret], header=(
        "peerstar swarm Secret: a new swarm key and bootstrap identity.\n"
        "Create it once per cluster (`kubectl create -f -`); re-applying a new one rotates\n"
        "the key, and every pod must then be restarted.")))
    return 0


def _upstreams(specs: list[str]) -> tuple[MirrorUpstream, ...]:
    upstreams = tuple(parse_mirror(s) for s in specs)
    names = [u.ns for u in upstreams]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise PeerstarError(f"--mirror: {', '.join(dup)} named more than once")
    return upstreams


def _mirror_config(upstreams: tuple[MirrorUpstream, ...], bridge: str = hosts.DEFAULT_BRIDGE,
                   config_path: str = hosts.CONFIG_PATH) -> str:
    if not upstreams:
        return ""
    text = "\n" + hosts.cri_registry_config(config_path)
    for path, body in hosts.hosts_files(upstreams, bridge, config_path).items():
        text += f"\n# ---- {path}\n" + "".join(f"# {line}\n" if line else "#\n"
                                                  for line in body.splitlines())
    return text


def cmd_manifests(args: argparse.Namespace) -> int:
    upstreams = _upstreams(args.mirror)
    opts = manifests.Options(namespace=args.namespace, kubo_image=args.kubo_image,
                             peerstar_image=args.peerstar_image, storage_max=args.storage_max,
                             mirrors=tuple(f"{u.ns}={u.url}" for u in upstreams))
    header = ("peerstar cluster: generated by `peerstar k8s manifests`.\n"
              "Needs the Secret from `peerstar k8s bootstrap` in the same namespace, and on\n"
              "every node this containerd config (`peerstar k8s containerd-config`):\n\n"
              + manifests.containerd_config() + _mirror_config(upstreams))
    sys.stdout.write(manifests.to_yaml(manifests.render_manifests(opts), header=header))
    return 0


def cmd_containerd_config(args: argparse.Namespace) -> int:
    upstreams = _upstreams(args.mirror)
    if args.hosts_dir is not None and not upstreams:
        raise PeerstarError("--hosts-dir needs at least one --mirror")
    if args.hosts_dir is not None:
        for upstream in upstreams:
            path = args.hosts_dir / upstream.ns / "hosts.toml"
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_write(path) as f:
                    f.write(hosts.hosts_toml(upstream, args.bridge).encode())
            except OSError as exc:
                raise PeerstarError(f"cannot write {path}: {exc.strerror or exc}") from None
    sys.stdout.write(manifests.containerd_config(args.socket, systemd_cgroup=not args.cgroupfs)
                     + _mirror_config(upstreams, args.bridge, args.config_path))
    return 0


def cmd_kind_config(args: argparse.Namespace) -> int:
    if not 0 <= args.workers <= 50:
        raise PeerstarError("--workers must be between 0 and 50")
    sys.stdout.write(manifests.to_yaml([manifests.kind_config(args.workers)],
                                       header="kind create cluster --config <this file>"))
    return 0


def cmd_kubo_config(args: argparse.Namespace) -> int:
    bootstrap: list[str] = []
    if bool(args.bootstrap_host) != bool(args.bootstrap_peer_id):
        raise PeerstarError("--bootstrap-host and --bootstrap-peer-id go together")
    if args.bootstrap_host:
        if not _DNS_NAME.match(args.bootstrap_host):
            raise PeerstarError(f"--bootstrap-host {args.bootstrap_host!r} is not a DNS name")
        if not _PEER_ID.match(args.bootstrap_peer_id):
            raise PeerstarError(f"--bootstrap-peer-id {args.bootstrap_peer_id!r} is not a "
                                "peer id (is the Secret from `peerstar k8s bootstrap` there?)")
        bootstrap.append(kubo.bootstrap_multiaddr(args.bootstrap_host, args.bootstrap_peer_id))
    identity = None
    if args.identity_file is not None:
        try:
            identity = keys.Identity.from_private_key(args.identity_file.read_text())
        except OSError as exc:
            raise PeerstarError(f"cannot read {args.identity_file}: {exc.strerror}") from None
    repo = args.repo.expanduser()
    cfg = kubo.configure_repo(repo, bootstrap=bootstrap, storage_max=args.storage_max,
                              identity=identity)
    print(f"kubo repo {repo}: peer {cfg.get('Identity', {}).get('PeerID', '?')}, "
          f"bootstrap {bootstrap or 'none'}")
    return 0
