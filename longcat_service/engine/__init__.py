"""Serving engine: scheduler, paged KV block manager, sampler, detokenizer, model runner, sync and async loops."""
