"""The one yes/no answer parser, and what makes a question a yes/no question.

Data validation, retrieval's reference vote, SFT's answer balance, the pair builder's rules and
the evaluation's VQA accuracy all read an answer's polarity here: its leading "yes" or "no" as a
whole word, punctuation before or after it allowed ("Yes.", "(yes)", "yes/no", "No, there is no
effusion"), case ignored. Anything else ("nope", "yes2", "There is no effusion", "") is "other".
"""

from __future__ import annotations

import re
from typing import Literal

YesNo = Literal["yes", "no", "other"]
_LEADING = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)
_AUX = {"is", "are", "was", "were", "does", "do", "did", "has", "have", "had", "can", "could",
        "will", "would", "should", "shall", "may", "might", "must"}


def yes_no(text: str) -> YesNo:
    """The leading yes/no of an answer: "Yes.", "yes, there is ..." -> yes; "No, there is no" -> no.

    Anything else ("Cardiomegaly.", "There is no effusion.", "Not sure", "") is "other".
    """
    m = _LEADING.match(text or "")
    return m.group(1).lower() if m else "other"  # type: ignore[return-value]


def is_yes_no_question(question: str) -> bool:
    """A closed question: it opens with an auxiliary verb and offers no alternatives (" or ")."""
    words = re.findall(r"[a-z']+", question.lower())
    return bool(words) and words[0] in _AUX and "or" not in words
