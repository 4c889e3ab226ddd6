"""The CRI (Kubernetes Container Runtime Interface) image API for tests: `api.proto` (a
subset of kubernetes/cri-api's), its committed stubs (`protogen.py`), and `client.py`'s
`CriImages`."""
