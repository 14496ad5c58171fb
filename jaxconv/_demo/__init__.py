"""The demo: the seed homework answered by the library, and a tiny CNN trained with optax."""
