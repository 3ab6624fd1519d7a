"""ARC-Gen: ARC-Challenge answered by generation, our reading of the paper's Table 2 column ("an ARC-Challenge
adaptation to generation tasks"; the paper gives no more detail, so every choice below is ours).

Data: ARC-Challenge's test split (allenai/ai2_arc, config ARC-Challenge; 1172 questions), 0-shot.

Prompt (the user turn under the chat template; the plain text with --no_chat_template): the options are lettered
A, B, C, ... in the dataset's order, whatever labels the row itself uses (a few ARC rows label them 1-4):

    Question: <question>
    A. <first option>
    B. <second option>
    ...
    Answer with the letter of the correct option.

Generation: greedy, at most 64 new tokens, ending at the model's end-of-sequence token.

The letter read from the generation (extract_letter), where "option letter" means one of the letters offered
for that question (upper case only) and "standing alone" means not followed by a letter or a digit:
  1. the first "answer" (any case), then optionally "is", optionally ":", optionally any of "*([", then an
     option letter standing alone: "The answer is B.", "answer: (C)", "Answer is **D**";
  2. else, when the generation starts (after white space and any of "*([") with an option letter standing alone:
     "B", "B. the sun", "(C)", "**A**";
  3. else no letter (the row scores 0).

Score: exact_match = 1 when that letter is the correct option's letter (the position of answerKey among the
row's labels), else 0; the column is the mean over the questions.
"""
import re

INSTRUCTION = "Answer with the letter of the correct option."
FRAME = "*(["  # characters allowed around a letter: markdown bold, brackets


def letters(doc: dict) -> str:
    """The option letters of a row: A, B, C, ... one per option."""
    return "".join(chr(ord("A") + i) for i in range(len(doc["choices"]["text"])))


def doc_to_text(doc: dict) -> str:
    options = [f"{letter}. {text}" for letter, text in zip(letters(doc), doc["choices"]["text"])]
    return "\n".join([f"Question: {doc['question']}", *options, INSTRUCTION])


def doc_to_target(doc: dict) -> str:
    return letters(doc)[doc["choices"]["label"].index(doc["answerKey"])]


def extract_letter(text: str, options: str) -> str | None:
    """The option letter a generation chose (rules 1-3 of the module docstring), None when it chose none."""
    letter = f"([{re.escape(options)}])(?![A-Za-z0-9])"
    frame = f"[{re.escape(FRAME)}]*"
    for pattern in (rf"(?i:answer)\s*(?:is\s*)?:?\s*{frame}{letter}", rf"^\s*{frame}{letter}"):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return None


def process_results(doc: dict, results: list) -> dict:
    """results: [the generated text] -> {"exact_match": 1.0 or 0.0}."""
    return {"exact_match": float(extract_letter(results[0], letters(doc)) == doc_to_target(doc))}
