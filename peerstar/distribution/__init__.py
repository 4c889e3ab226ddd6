"""The OCI distribution API as a client: how peerstar talks to a container registry.

At the bottom of the dependency graph (it imports only `peerstar.errors` and the OCI
primitives), so image sources, the lazy fetcher, the snapshotter and the registry's
upstream side all reach registries the same way.

- `challenge`: the token-auth challenge and token answer as pure functions.
- `auth`: `RegistryAuth`, the `httpx.Auth` for anonymous, basic and bearer access.
- `tls`: the TLS trust every registry client uses (`tls_context(ca_file)`).
- `client`: where a registry is (`registry_base`, `blob_url`), the httpx clients, and
  `RegistryClient` / `AsyncRegistryClient` (manifests, blobs, ranges) with their one
  error, `RegistryError` (HTTP status and distribution error code).
"""
