// Start a js-ipfs daemon for peerstar's tests (see tests/support/jsipfs.py).
//
// Why not `jsipfs daemon`: the stock daemon ignores $IPFS_PATH/swarm.key, so a
// private network (as the seed deployment uses) cannot be tested with it. Here the
// libp2p factory adds a pnet connection protector when a swarm key is present.
//
// Usage: IPFS_PATH=<initialised repo> node start.mjs
//   [SWARM_KEY=<path to swarm.key>]   default: $IPFS_PATH/swarm.key if it exists
// Prints `PEERSTAR-JSIPFS-READY <peer id>` on stdout once the HTTP API listens;
// SIGTERM/SIGINT stop it cleanly (exit 0).
import fs from 'node:fs'
import path from 'node:path'
import { Daemon } from 'ipfs-daemon'
import { createLibp2p } from 'libp2p'
import { preSharedKey } from 'libp2p/pnet'

const repo = process.env.IPFS_PATH
if (!repo) {
  console.error('IPFS_PATH must name an initialised js-ipfs repo')
  process.exit(2)
}
let keyPath = process.env.SWARM_KEY
if (!keyPath && fs.existsSync(path.join(repo, 'swarm.key'))) {
  keyPath = path.join(repo, 'swarm.key')
}
const psk = keyPath ? new Uint8Array(fs.readFileSync(keyPath)) : null

const daemon = new Daemon({
  repo,
  repoAutoMigrate: false,
  offline: false,
  preload: { enabled: false },
  silent: true,
  libp2p: async ({ libp2pOptions }) => {
    if (psk) {
      libp2pOptions.connectionProtector = preSharedKey({ psk })
    }
    return createLibp2p(libp2pOptions)
  }
})

let stopping = false
async function stop () {
  if (stopping) return
  stopping = true
  try {
    await daemon.stop()
  } catch (err) {
    console.error('stop failed:', err)
  }
  process.exit(0)
}
process.on('SIGTERM', stop)
process.on('SIGINT', stop)

try {
  await daemon.start()
  const id = await daemon._ipfs.id()
  console.log(`PEERSTAR-JSIPFS-READY ${id.id.toString()} pnet=${psk ? 'on' : 'off'}`)
} catch (err) {
  console.error('daemon failed to start:', err)
  process.exit(1)
}
