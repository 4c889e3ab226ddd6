"""One conformance suite for both backends: the kubo RPC client against the real js-ipfs
daemon, and the embedded store. Same inputs, same CIDs, same bytes, same errors."""

from __future__ import annotations

import io
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest

from peerstar.ipfs import CHUNK_SIZE, CIDError, IPFSError, OffsetError, compute_cid
from tests.ipfs.conftest import make_store, run

Backend = tuple[str, dict[str, Any]]
DATA = random.Random(42).randbytes(3 * CHUNK_SIZE + 1000)


def test_add_cat_and_cid(backend: Backend) -> None:
    async def go() -> None:
        async with make_store(backend) as s:
            cid = await s.add(DATA)
            assert cid == compute_cid(DATA)
            assert cid.startswith("bafybei")
            assert await s.cat_bytes(cid) == DATA
            assert await s.stat_size(cid) == len(DATA)

    run(go())


@pytest.mark.parametrize(
    "offset,length",
    [(0, 1), (1, 10), (CHUNK_SIZE - 5, 10), (CHUNK_SIZE, CHUNK_SIZE), (2 * CHUNK_SIZE - 1, None),
     (len(DATA) - 1, 5), (len(DATA), None), (len(DATA), 7), (12345, 0), (0, len(DATA) + 99)],
)
def test_offset_reads(backend: Backend, offset: int, length: int | None) -> None:
    async def go() -> None:
        async with make_store(backend) as s:
            cid = await s.add(DATA)
            got = await s.cat_bytes(cid, offset, length)
            end = None if length is None else offset + length
            assert got == DATA[offset:end]

    run(go())


def test_offset_past_end_is_an_error(backend: Backend) -> None:
    async def go() -> None:
        async with make_store(backend) as s:
            cid = await s.add(b"0123456789")
            with pytest.raises(OffsetError, match="past the end"):
                await s.cat_bytes(cid, 11)

    run(go())


def test_streaming_cat_yields_all_bytes_in_order(backend: Backend) -> None:
    async def go() -> None:
        async with make_store(backend) as s:
            cid = await s.add(DATA)
            parts = [p async for p in s.cat(cid, 100)]
            assert len(parts) > 1
            assert b"".join(parts) == DATA[100:]

    run(go())


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE, CHUNK_SIZE + 1])
def test_small_and_boundary_sizes(backend: Backend, size: int) -> None:
    data = random.Random(size).randbytes(size)

    async def go() -> None:
        async with make_store(backend) as s:
            cid = await s.add(data)
            assert cid == compute_cid(data)
            assert await s.cat_bytes(cid) == data
            assert await s.stat_size(cid) == size

    run(go())


def test_input_kinds_give_the_same_cid(backend: Backend) -> None:
    async def pieces() -> AsyncIterator[bytes]:
        # Odd piece sizes: the chunker must re-cut them into 256 KiB chunks.
        for i in range(0, len(DATA), 77777):
            yield DATA[i : i + 77777]

    async def go() -> None:
        async with make_store(backend) as s:
            want = compute_cid(DATA)
            assert await s.add(DATA) == want
            assert await s.add(io.BytesIO(DATA)) == want
            assert await s.add(pieces()) == want
            assert await s.add(bytearray(DATA)) == want

    run(go())


def test_only_hash_stores_nothing(backend: Backend) -> None:
    data = random.Random(99).randbytes(CHUNK_SIZE + 17) + backend[0].encode()

    async def go() -> None:
        async with make_store(backend) as s:
            cid = await s.add(data, only_hash=True)
            assert cid == compute_cid(data)
            if backend[0] == "embedded":
                with pytest.raises(IPFSError, match="not in the embedded store"):
                    await s.cat_bytes(cid)
                assert not s.has(cid)  # type: ignore[attr-defined]
            else:
                # The daemon would search the network for it: ask for the local block only
                # by a short timeout that must expire.
                s.timeout, s.retries = 2.0, 0  # type: ignore[attr-defined]
                with pytest.raises(IPFSError):
                    await s.block_get(cid)

    run(go())


def test_pin_and_block_get(backend: Backend) -> None:
    async def go() -> None:
        async with make_store(backend) as s:
            small = b"a single raw block"
            cid = await s.add(small, pin=False)
            await s.pin(cid)
            assert await s.block_get(cid) == small
            big = await s.add(DATA, pin=False)
            await s.pin(big)
            root = await s.block_get(big)
            assert root[:1] == b"\x12"  # dag-pb: Links (field 2) come first
            ident = await s.id()
            assert ident["ID"]

    run(go())


@pytest.mark.parametrize("bad", ["not-a-cid", "bafyxx", "Qm123"])
def test_malformed_cid(backend: Backend, bad: str) -> None:
    async def go() -> None:
        async with make_store(backend) as s:
            with pytest.raises(CIDError, match="not a valid CID"):
                await s.cat_bytes(bad)
            with pytest.raises(CIDError):
                await s.block_get(bad)

    run(go())


def test_cids_returned_are_v1_base32_whatever_the_input_base(backend: Backend) -> None:
    from multiformats import CID

    async def go() -> None:
        async with make_store(backend) as s:
            cid = await s.add(DATA)
            b58 = str(CID.decode(cid).set(base="base58btc"))
            assert await s.cat_bytes(b58, 0, 10) == DATA[:10]
            assert await s.stat_size(b58) == len(DATA)

    run(go())
