"""OpenVINO backend (CPU plugin): compile to IR xml/bin with pinned inference precision."""
