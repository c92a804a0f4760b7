"""Front ends over the library: the AutoRound facade, demo, bench, evaluation, offline assets."""
