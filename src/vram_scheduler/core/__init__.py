"""Pure rules: configuration, wire models, inventory, capacity, placement, the ledger. No Ray, no HTTP."""
