"""The Hugging Face Hub and the local Hub cache: a model reference resolved to a local folder (``resolve``),
repo ids (``repo_id``), the cache shared with transformers and mlx-lm (``cache``), pulling a checkpoint
(``pull``), reading a repo's headers without its weights (``remote``), the Hub's errors in one line
(``errors``)."""
