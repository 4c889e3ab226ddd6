// Oracle for multi-level layouts: run js-ipfs's own UnixFS importer (the code its daemon
// uses for `add`) on a file with a chosen chunk size and links-per-node, and print the
// root CID (v1, base32). A real 3-level tree at kubo's 174 links needs > 7.9 GB; with
// small chunks and few links the same algorithm builds deep trees from a few KB.
//
// Usage: node importer.mjs FILE CHUNK_SIZE MAX_CHILDREN_PER_NODE
import fs from 'node:fs'
import { importer } from 'ipfs-unixfs-importer'

const [file, chunkSize, maxChildren] = process.argv.slice(2)
const data = fs.readFileSync(file)
const blockstore = { put: async (cid) => cid, get: async () => { throw new Error('unused') }, has: async () => false }
let root
for await (const entry of importer([{ content: data }], blockstore, {
  cidVersion: 1,
  rawLeaves: true,
  onlyHash: true,
  strategy: 'balanced',
  reduceSingleLeafToSelf: true,
  maxChunkSize: Number(chunkSize),
  maxChildrenPerNode: Number(maxChildren)
})) {
  root = entry.cid
}
console.log(root.toString())
