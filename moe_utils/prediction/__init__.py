"""Routing prediction: the next layers' experts predicted from routing (:mod:`.routing_prediction`)
or hidden states (:mod:`.hidden_prediction`), and an offloading cache fed by a prefetcher (:mod:`.expert_cache`)."""
