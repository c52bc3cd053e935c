"""Applications built on the library: the demo and the benchmarks; the core never imports them."""
