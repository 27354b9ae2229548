"""OpenAI-compatible HTTP API (FastAPI on uvicorn) served beside gRPC, in the same process and event loop, over the
same AsyncEngine: /v1/chat/completions, /v1/completions, /v1/models, /tokenize, /detokenize, /health, /metrics and
a playground page at /. Admission, auth, metrics and drain are the gRPC server's own objects, shared."""
