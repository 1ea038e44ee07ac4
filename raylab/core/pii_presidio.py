"""`data.pii.engine: presidio`: Microsoft Presidio's analyzer behind raylab's detector interface.

    pip install 'raylab[presidio]'                 # presidio-analyzer (and spaCy, without a model)
    python -m spacy download en_core_web_lg        # optional, where a model hub is reachable: names

Presidio finds EMAIL, PHONE, CREDIT_CARD, IBAN, IP_ADDRESS and US_SSN with its pattern
recognisers, and PERSON only with a spaCy NER model installed
(en_core_web_lg/md/sm/trf, the first found). Without one it runs on its `no_op` NLP engine:
patterns only, no names; context words then come only from the patterns themselves. The
types Presidio does not cover (SECRET, ADDRESS, DATE_OF_BIRTH, PASSPORT, ID_NUMBER, and PERSON
without a model) stay with raylab's own detectors, so switching engines never drops a type.
"""

from __future__ import annotations

import functools
import importlib.util
import threading

from raylab.errors import UserError

# Presidio entity -> raylab type
ENTITIES = {
    "EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "CREDIT_CARD": "CREDIT_CARD", "IBAN_CODE": "IBAN",
    "IP_ADDRESS": "IP_ADDRESS", "US_SSN": "US_SSN", "PERSON": "PERSON",
}
# Presidio scores each finding; below this its weakest patterns (any 9 digits as a US SSN at
# 0.05) would redact order numbers. Its phone and e-mail findings start at 0.4 and above.
SCORE_THRESHOLD = 0.4
SPACY_MODELS = ("en_core_web_lg", "en_core_web_md", "en_core_web_sm", "en_core_web_trf")
INSTALL_HINT = "pip install 'raylab[presidio]'"


def spacy_model() -> str | None:
    return next((m for m in SPACY_MODELS if importlib.util.find_spec(m) is not None), None)


def require() -> None:
    if importlib.util.find_spec("presidio_analyzer") is None:
        raise UserError(f"data.pii.engine: presidio needs Presidio's analyzer: {INSTALL_HINT}")


@functools.lru_cache(maxsize=4)
def analyzer(regions: tuple[str, ...]):
    """One AnalyzerEngine per process and region set (its set-up takes seconds)."""
    require()
    import tldextract
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    # Presidio's e-mail recognizer asks tldextract, which downloads the public suffix list
    # on first use; raylab runs offline, so it reads the snapshot tldextract ships.
    tldextract.extract = tldextract.TLDExtract(suffix_list_urls=())
    model = spacy_model()
    conf = ({"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": model}]} if model else
            {"nlp_engine_name": "no_op", "models": [{"lang_code": "en", "model_name": "no_op"}]})
    nlp = NlpEngineProvider(nlp_configuration=conf).create_engine()
    import warnings

    with warnings.catch_warnings():  # "no_op cannot use context words": said in the docstring
        warnings.simplefilter("ignore", UserWarning)
        engine = AnalyzerEngine(nlp_engine=nlp, supported_languages=["en"])
    engine.registry.remove_recognizer("PhoneRecognizer")
    # Presidio names the UK "UK"; libphonenumber (which it uses) says "GB".
    engine.registry.add_recognizer(PhoneRecognizer(supported_regions=list(regions)))
    return engine


class Finder:
    """Spans of one raylab type from Presidio's analysis of a text. The detectors of one
    engine share an instance, which analyses each distinct text once."""

    def __init__(self, regions):
        self.regions = tuple(regions)
        self._lock = threading.Lock()
        self._last: tuple[str, list] | None = None

    def covered(self) -> set[str]:
        return {t for e, t in ENTITIES.items() if e != "PERSON" or spacy_model()}

    def results(self, text: str) -> list:
        with self._lock:
            if self._last is None or self._last[0] != text:
                found = analyzer(self.regions).analyze(text, language="en", entities=list(ENTITIES),
                                                       score_threshold=SCORE_THRESHOLD)
                self._last = (text, [(ENTITIES[r.entity_type], r.start, r.end) for r in found])
            return self._last[1]

    def spans(self, kind: str):
        return functools.partial(self._spans, kind)

    def _spans(self, kind: str, text: str) -> list[tuple[int, int]]:
        return [(s, e) for t, s, e in self.results(text) if t == kind]
