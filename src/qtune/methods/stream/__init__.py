"""Stream methods: they change the backbone's hidden states, so they train live through (part of) the stream."""
