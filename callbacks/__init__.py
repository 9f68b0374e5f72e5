"""Lightning callbacks of rerule-lightning (the ReRULE replay callback and its ablations live here)."""
