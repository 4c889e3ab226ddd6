"""Conversion, the second stage of the flow (source -> convert -> IPFS -> registry ->
fetcher -> FUSE -> containerd): layers to eStargz or zstd:chunked, images rewritten.

- `layer`: one layer tar to a blob (`build_layer`, `convert_layer_file`), the options
  (`ConvertOptions`) and per-layer results (`LayerReport`);
- `image`: a whole source image (`peerstar.source`) into an OCI layout
  (`convert_image` into a `LayoutWriter`, `convert` from reference to reference).
The format itself is `peerstar.estargz` (pure); this package is its policy for images.
"""

from peerstar.convert.image import ImageReport, convert, convert_image
from peerstar.convert.layer import (
    ConvertError,
    ConvertOptions,
    LayerReport,
    build_layer,
    convert_layer_file,
)

__all__ = [
    "ConvertError", "ConvertOptions", "ImageReport", "LayerReport", "build_layer",
    "convert", "convert_image", "convert_layer_file",
]  # fmt: skip
