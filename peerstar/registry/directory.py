"""Who in the cluster holds a digest, with no central server: the mirror's directory.

Owns the digest -> IPFS content mapping of the registry mirror (docs/mirror.md), kept on
IPFS pubsub, the one primitive both kubo and js-ipfs 0.66 offer over the HTTP RPC
(`ContentStore.pubsub_publish` / `pubsub_subscribe`; js-ipfs 0.66 runs with
`Routing.Type: none`, so provider records are not an option there). Every bridge
subscribes to one topic and

- announces (`have`) every record it verified itself: a blob or manifest it added or
  read whole and hashed (`digest -> CID, size, media type`, and `public`: the upstream
  gave that digest to an anonymous request, so the mirror may serve it to anyone when the
  upstream cannot be reached), and every tag it resolved
  at an upstream (`tag key -> digest, when`);
- remembers the records it hears (bounded, newest kept), so most lookups are a local
  dictionary hit costing no message at all;
- on a miss asks (`want`) and takes the first `have` for that key heard within the
  lookup timeout; holders answer `want`s for records they verified themselves;
- before fetching a digest nobody holds from the upstream, `claim`s it: a bridge that
  already heard a claim or a `have` for it waits; else it publishes a claim, listens for
  one lookup timeout, and fetches only if by then it heard neither a `have` (a holder
  answers claims as it answers `want`s) nor a claim from a lower node id. The others
  wait for the winner's `have` (bounded) and then read it from the swarm. While a
  message's round trip between two bridges stays within the lookup timeout, N bridges
  claiming one digest at once fetch it once (docs/mirror.md, "Concurrent pulls"). A
  winner that fails says so (`drop`) and the waiters go to the upstream themselves.

Nothing heard is trusted: a record only names where to look; the mirror verifies every
byte against the digest before serving it, and falls back to the next source.

The same directory carries the read profiles of image layers (`profiles`: key
`profile:<layer digest>`, value the profile's text, up to `profiles.MAX_TEXT`
characters): every bridge whose store has pubsub runs one, mirror or not. Profiles heard
are kept (at most `MAX_PROFILES`) and, unlike other records, answered for by every node
that keeps one, so a profile outlives the node that recorded it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from peerstar.ipfs import ContentStore
from peerstar.registry.profiles import MAX_TEXT
from peerstar.registry.upstream import log_upstream

log = logging.getLogger("peerstar.registry.directory")

TOPIC = "peerstar/mirror/v1"
# Records a bridge remembers; ~200 bytes each.
MAX_RECORDS = 100_000
_MAX_MESSAGE = 4096
_MAX_ADDRS = 4
PROFILE_PREFIX = "profile:"
# Profile records a bridge remembers; up to ~3 KiB each.
MAX_PROFILES = 4096


@dataclass(frozen=True)
class Record:
    """`key` (a digest, or `tag:<ns>/<name>:<tag>`) -> `value` (a CID for a digest, a digest
    for a tag); `size` and `media_type` of the content; `at`: when a tag was resolved;
    `peers`: swarm multiaddrs (`.../p2p/<id>`) of the IPFS node holding it; `public`: the
    upstream gave this digest to an anonymous HEAD (checked by the announcing bridge)."""

    key: str
    value: str
    size: int = 0
    media_type: str = ""
    at: float = 0.0
    peers: tuple[str, ...] = ()
    public: bool = False

    def message(self, node: str, peers: tuple[str, ...] = ()) -> bytes:
        return json.dumps({"op": "have", "from": node, "k": self.key, "v": self.value,
                           "s": self.size, "m": self.media_type, "at": self.at,
                           "p": list(peers or self.peers), "pub": self.public},
                          separators=(",", ":")).encode()


def _record(msg: dict[str, object]) -> Record | None:
    key, value = msg.get("k"), msg.get("v")
    size, media, at = msg.get("s", 0), msg.get("m", ""), msg.get("at", 0.0)
    if not (isinstance(key, str) and isinstance(value, str) and isinstance(size, int)
            and isinstance(media, str) and isinstance(at, int | float)):
        return None
    max_value = MAX_TEXT if key.startswith(PROFILE_PREFIX) else 200
    if not 0 < len(key) <= 600 or not 0 < len(value) <= max_value or size < 0:
        return None
    peers = msg.get("p", [])
    if not isinstance(peers, list):
        return None
    addrs = tuple(p for p in peers[:_MAX_ADDRS] if isinstance(p, str) and p.startswith("/")
                  and len(p) <= 300)
    return Record(key, value, size, media, float(at), addrs, msg.get("pub") is True)


class Directory:
    """The records of one bridge and its view of the cluster's; `start()` subscribes."""

    def __init__(self, store: ContentStore, *, timeout: float = 0.05,
                 topic: str = TOPIC, on_have: Callable[[Record], None] | None = None
                 ) -> None:
        self.store = store
        self.on_have = on_have  # called with every record heard from another node
        self.timeout = timeout
        self.topic = topic
        self.node = os.urandom(8).hex()  # tells our own messages from others'
        # This node's swarm addresses, sent with its records: a reader connects to them
        # (a daemon without routing, like js-ipfs here, fetches only from its peers).
        self.addresses: tuple[str, ...] = ()
        self.own: dict[str, Record] = {}  # verified here: answered to `want`s
        self.heard: OrderedDict[str, Record] = OrderedDict()
        self._profiles: OrderedDict[str, None] = OrderedDict()  # profile keys in `heard`
        self._waiters: dict[str, list[asyncio.Future[Record | None]]] = {}
        # key -> {node id: when heard} of the other bridges' live claims
        self.claims: dict[str, dict[str, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.addresses = await _swarm_addresses(self.store)
        self._task = asyncio.create_task(self._listen())
        await asyncio.sleep(0)

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    # -- records ---------------------------------------------------------------------------
    def verified(self, record: Record) -> None:
        """`record` was verified on this node: remember it, answer for it, announce it."""
        self.own[record.key] = record
        self._remember(record)
        self.claims.pop(record.key, None)
        self._send(record.message(self.node, self.addresses))

    def forget(self, key: str, value: str) -> None:
        """A record proved wrong (content missing or not matching): drop it."""
        for table in (self.own, self.heard):
            rec = table.get(key)
            if rec is not None and rec.value == value:
                del table[key]

    def _remember(self, record: Record) -> None:
        old = self.heard.get(record.key)
        if old is not None and old.at > record.at:
            return  # a tag resolved later wins
        self.heard[record.key] = record
        self.heard.move_to_end(record.key)
        while len(self.heard) > MAX_RECORDS:
            self._profiles.pop(self.heard.popitem(last=False)[0], None)
        if record.key.startswith(PROFILE_PREFIX):
            self._profiles[record.key] = None
            self._profiles.move_to_end(record.key)
            while len(self._profiles) > MAX_PROFILES:
                old_key = self._profiles.popitem(last=False)[0]
                if old_key not in self.own:
                    self.heard.pop(old_key, None)

    async def lookup(self, key: str, timeout: float | None = None) -> Record | None:
        """A record for `key`: the one known here, else the first answer to a `want` heard
        within `timeout` (default: the directory's), else None."""
        # The newest of ours and the cluster's (a tag another bridge resolved later wins;
        # for a digest both have at=0 and ours, verified here, comes first).
        known = [r for r in (self.own.get(key), self.heard.get(key)) if r is not None]
        if known:
            return max(known, key=lambda r: r.at)
        self._op("want", key)
        return await self._wait(key, self.timeout if timeout is None else timeout)

    async def _wait(self, key: str, timeout: float) -> Record | None:
        """The first `have` for `key` heard within `timeout` (None: none, or a drop)."""
        future: asyncio.Future[Record | None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, []).append(future)
        try:
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            return None
        finally:
            waiters = self._waiters.get(key, [])
            if future in waiters:
                waiters.remove(future)
            if not waiters:
                self._waiters.pop(key, None)

    def _live_claims(self, key: str, max_age: float) -> dict[str, float]:
        now = time.monotonic()
        live = {n: t for n, t in self.claims.get(key, {}).items() if now - t < max_age}
        if live:
            self.claims[key] = live
        else:
            self.claims.pop(key, None)
        return live

    def _known(self, key: str) -> Record | None:
        return self.own.get(key) or self.heard.get(key)

    async def claim(self, key: str, max_age: float = 300.0) -> bool:
        """Whether this bridge should fetch `key` from the upstream. False (then
        `wait_for(key)` gives the holder's record) when, before this bridge decides, it
        heard a `have` for `key`, a claim (within `max_age` s) before publishing its own,
        or a claim from a lower node id.

        Only bridges that heard no claim publish one, so the claims that compete were
        all sent within one message delay of each other; each is heard by every rival
        within two delays, a round trip. The decision comes one lookup timeout (itself
        the bound on a `want`'s round trip) after our claim is out (the publish call
        returned): within that bound every competing bridge has heard every other, and
        the lowest id among them fetches, alone. A `have` heard by then ends the claim
        too: a bridge that verified the blob before we listened answers our claim."""
        if self._known(key) is not None or self._live_claims(key, max_age):
            return False
        started = time.monotonic()
        await self._publish(self._op_message("claim", key))
        await asyncio.sleep(self.timeout)  # rival claims of the same moment arrive
        rivals = self._live_claims(key, max_age)
        won = self._known(key) is None and not any(n < self.node for n in rivals)
        log_upstream("mirror-claim", "", started, time.monotonic() - started, 0.0,
                     digest=key, node=self.node, won=won, rivals=sorted(rivals))
        return won

    async def wait_for(self, key: str, timeout: float) -> Record | None:
        """After a lost `claim`: the winner's record, or None after `timeout` or its drop."""
        known = self.own.get(key) or self.heard.get(key)
        return known if known is not None else await self._wait(key, timeout)

    def drop(self, key: str) -> None:
        """This bridge's claim on `key` failed: whoever waits on it should fetch it."""
        self._op("drop", key)

    def _op(self, op: str, key: str) -> None:
        self._send(self._op_message(op, key))

    def _op_message(self, op: str, key: str) -> bytes:
        return json.dumps({"op": op, "from": self.node, "k": key},
                          separators=(",", ":")).encode()

    # -- messages ----------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        task = asyncio.create_task(self._publish(data))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, data: bytes) -> None:
        try:
            await self.store.pubsub_publish(self.topic, data)
        except Exception as exc:  # a lost message costs a trip to the upstream, no more
            log.warning("pubsub publish on %s failed: %s", self.topic, exc)

    async def _listen(self) -> None:
        delay = 1.0
        while True:
            try:
                async for data in self.store.pubsub_subscribe(self.topic):
                    delay = 1.0
                    self._handle(data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # e.g. kubo without Pubsub.Enabled: retried, slower
                log.warning("pubsub subscription to %s failed: %s; retrying in %g s",
                            self.topic, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    def _handle(self, data: bytes) -> None:
        if len(data) > _MAX_MESSAGE:
            return
        try:
            msg = json.loads(data)
        except ValueError:
            return
        if not isinstance(msg, dict) or msg.get("from") == self.node:
            return
        op, key, sender = msg.get("op"), msg.get("k"), msg.get("from")
        if not isinstance(key, str) or not isinstance(sender, str) or len(key) > 600:
            return
        if op == "want":
            rec = self.own.get(key)
            if rec is None and key.startswith(PROFILE_PREFIX):
                rec = self.heard.get(key)
            if rec is not None:
                self._send(rec.message(self.node, self.addresses))
        elif op == "claim":
            claims = self.claims.setdefault(key, {})
            claims[sender[:64]] = time.monotonic()
            if len(self.claims) > MAX_RECORDS:
                self.claims.pop(next(iter(self.claims)))
            rec = self.own.get(key)
            if rec is not None:  # a claimer that missed our announcement: it waits
                self._send(rec.message(self.node, self.addresses))
        elif op == "drop":
            self.claims.get(key, {}).pop(sender[:64], None)
            for future in self._waiters.get(key, []):
                if not future.done():
                    future.set_result(None)
        elif op == "have":
            rec = _record(msg)
            if rec is None:
                return
            self._remember(rec)
            self.claims.pop(rec.key, None)
            if self.on_have is not None:
                self.on_have(rec)
            for future in self._waiters.get(rec.key, []):
                if not future.done():
                    future.set_result(rec)


async def _swarm_addresses(store: ContentStore) -> tuple[str, ...]:
    """The node's non-loopback swarm multiaddrs with its peer id (none if unknown)."""
    try:
        ident = await store.id()
    except Exception as exc:
        log.warning("cannot read the IPFS node's identity: %s", exc)
        return ()
    peer = ident.get("ID") or ""
    addrs = []
    for addr in ident.get("Addresses") or []:
        if not isinstance(addr, str) or "/ip4/127." in addr or "/ip6/::1/" in addr:
            continue
        addrs.append(addr if "/p2p/" in addr else f"{addr}/p2p/{peer}")
    return tuple(addrs[:_MAX_ADDRS]) if peer else ()


def tag_key(ns: str, name: str, tag: str) -> str:
    return f"tag:{ns}/{name}:{tag}"
