"""The backdoor harness: what researchers need to evaluate a defense, built on the core library.

- :mod:`~nft_fast.harness.attacks`: BadNets, Blend, SIG, Trojan, WaNet, Input-aware;
- :mod:`~nft_fast.harness.baselines`: baseline defenses (fine-tuning, ANP) and NFT ablations;
- :mod:`~nft_fast.harness.datasets`: Fashion-MNIST, the defender/attacker split, synthetic tasks;
- :mod:`~nft_fast.harness.train`: plain supervised training of (backdoored) classifiers;
- :mod:`~nft_fast.harness.runs`: backdoored-model run folders and their cache;
- :mod:`~nft_fast.harness.grid`: attacks x defenses tables.

Imports point down only: the harness uses the core (``nft_fast``), never the app.
"""
