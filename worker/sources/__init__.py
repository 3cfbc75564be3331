"""Event sources: each turns its own message format into validated :class:`schemas.events.ImageEvent`
objects and publishes them with :func:`worker.sources.common.publish_events`. Nothing downstream
knows which source an event came from (except the ``source`` metrics label)."""
