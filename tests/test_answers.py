"""Answer checking: the MATH-500 parser on the reasoning book's own table, GSM8K's number."""

import pytest

from gptflax.answers import extract_final_candidate, grade_answer, gsm8k_answer

pytestmark = pytest.mark.evaluate

# "Build a Reasoning Model (From Scratch)" ch. 3, run_demos_table: (predicted, expected, equal).
BOOK_TABLE = [
    ("3/4", r"\frac{3}{4}", True), ("(3)/(4)", "3/4", True),
    (r"\frac{\sqrt{8}}{2}", "sqrt(2)", True),
    (r"\( \frac{1}{2} + \frac{1}{6} \)", "2/3", True), ("(1, 2)", "(1,2)", True),
    ("(2, 1)", "(1, 2)", False), ("(1, 2, 3)", "(1, 2)", False), ("0.5", "1/2", True),
    ("0.3333333333", "1/3", False), ("1,234/2", "617", True), (r"\text{2/3}", "2/3", True),
    ("50%", "1/2", False), (r"2\cdot 3/4", "3/2", True), (r"90^\circ", "90", True),
    (r"\left(\frac{3}{4}\right)", "3/4", True), ("2²", "2**2", True),
    ("14/3", r"\frac{14}{3}", True), ("(14/3, 2/3)", "(14/3, 4/6)", True),
]  # fmt: skip


@pytest.mark.parametrize("predicted, expected, equal", BOOK_TABLE)
def test_the_reasoning_books_table_of_equivalent_answers(predicted, expected, equal):
    assert grade_answer(predicted, expected) is equal


@pytest.mark.parametrize(
    "text, answer",
    [
        (r"so $x = \boxed{\frac{1}{2}}$ and then \boxed{ {3}+1 }", "{3}+1"),  # last, nested
        (r"\boxed{$42$}", "42"),  # dollars stripped
        (r"\boxed{7", "7"),  # unbalanced: the last number
        ("no box: 3 apples and 1,234 pears", "234"),
        ("no number at all", "no number at all"),
        ("", ""),
    ],
)
def test_the_final_answer_is_the_last_box_else_the_last_number(text, answer):
    assert extract_final_candidate(text) == answer


@pytest.mark.parametrize(
    "text, number",
    [
        ("She has 5 + 4 = 9 apples. So the answer is 9.", "9"),
        ("Total is $1,234.50 in all. So the answer is $1,234.50.", "1234.50"),
        ("It costs 3 dollars, then 12 more: 15", "15"),
        ("The loss is -7. So the answer is -7.\n\nQuestion: 2 + 2", "-7"),
        ("I do not know.", ""),
    ],
)
def test_the_gsm8k_answer_is_the_final_number(text, number):
    assert gsm8k_answer(text) == number


def test_every_math500_answer_in_a_box_grades_as_itself():
    """The reasoning book's self-consistency check: \\boxed{answer} against answer, 500/500."""
    from gptflax import benchmarks

    answers = [item.answer for item in benchmarks.load_task("math500")]
    assert sum(grade_answer(extract_final_candidate(f"\\boxed{{{a}}}"), a) for a in answers) == 500
