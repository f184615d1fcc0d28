"""wasm export (placeholder)."""
def export_wasm(ex, spec, out):
    raise NotImplementedError
