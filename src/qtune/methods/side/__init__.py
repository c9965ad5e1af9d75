"""Side-path methods: they read the frozen stream's Taps and never change it, so they train from caches."""
