// warren management UI (plain JS, no build step).
