"""Will it fit (Ray Tune): one candidate measured (trial), the verdict, the sweep; `python -m fwray.probe`."""
