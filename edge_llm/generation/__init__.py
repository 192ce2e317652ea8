"""Generation: sampling, the token loop, chat sessions, context windows, per-model sampling defaults."""
