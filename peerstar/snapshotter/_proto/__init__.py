"""Generated containerd snapshots v1 stubs (see protogen.py)."""
