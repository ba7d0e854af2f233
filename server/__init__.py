"""The HTTP server (``lofit-serve``) over vLLM with the LoFiT plugin; arrives in the next milestone."""
