"""`nanokimi serve`: an OpenAI-compatible HTTP server over the inference engine (needs the serve extra).

    from nanokimi.serve import ServeOptions, Server, create_app
    app = create_app(Server.load("runs/tiny", ServeOptions(ttft_slo_ms=2000, kv_offload_gb=8)))
"""
from nanokimi.serve.app import ServeOptions, Server, create_app

__all__ = ["ServeOptions", "Server", "create_app"]
