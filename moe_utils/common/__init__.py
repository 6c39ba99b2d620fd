"""What every stage uses: atomic, verified artifacts (:mod:`.artifacts`), the key of every reuse
(:mod:`.fingerprint`), the verified keyed cache (:mod:`.cache`), text made safe for the book (:mod:`.markup`), figures (:mod:`.plotting`),
intervals and tests (:mod:`.stats`) and the thread policy (:mod:`.threads`)."""
