"""The parts of the serving benchmark driver ``bench/run_all.py`` (``python -m bench.run_all``), one job a file:

* ``config``             the settings (``Config``), the command line, the engines' environment;
* ``variants``           which adapter or LoRA each request of a variant uses, spelled for the engine and HTTP;
* ``engine_target``      an ``AsyncLLM`` in-process client (stock, plugin or LoRA) that runs one round;
* ``http_target``        a server subprocess (``lofit-serve`` or vLLM's OpenAI server) that runs one round;
* ``reference_target``   transformers ``generate`` with per-row adapters that runs one round;
* ``rounds``             the interleaved rounds over variants and concurrencies, medians per cell;
* ``phase_offline``      phase 1: offline engines (parts offline, reference, memory);
* ``phase_lora``         phase 2: vLLM LoRA engines and the plugin in the same mode (parts lora, hotload);
* ``phase_http``         phase 3: the HTTP servers (parts http, hotload, memory);
* ``memory``             the adapter bank's size, computed and measured in a worker; RSS for 100 loads;
* ``goals``              the goals and their PASS/MISS verdicts;
* ``tables``             the markdown tables each part prints;
* ``report``             ``results.md`` and ``results.json``;
* ``plots``              the PNG figures.
"""
