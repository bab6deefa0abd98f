"""A newcomer's way in: the root's shard plan and the newcomer's link probe."""
