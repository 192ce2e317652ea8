"""The OpenAI-compatible server behind ``edge-llm serve``.

``schema`` checks a request and turns it into a ``job.Job``; ``engine.Engine`` decodes every running job
together on one thread (continuous batching, ``row.Row`` per job, ``prompt_cache`` for reuse across
turns); ``openai_format`` shapes what goes back; ``app`` is the Starlette app; ``server`` runs it with
uvicorn. Nothing here prints: ``cli/serve.py`` does.
"""
