import pytest

from longcat_service.chat_template import LONGCAT_CHAT_TEMPLATE, ChatTemplateError, render_chat_template

# None = the Python renderer, LONGCAT_CHAT_TEMPLATE = the same format as a checkpoint's jinja template.
BOTH_RENDERERS = pytest.mark.parametrize("template", [None, LONGCAT_CHAT_TEMPLATE], ids=["python", "jinja"])


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


@BOTH_RENDERERS
def test_single_turn(template):
    assert render_chat_template([user("Paris is...")], template) == "[Round 0] USER:Paris is... ASSISTANT:"


@BOTH_RENDERERS
def test_system_prompt(template):
    got = render_chat_template([system("Be brief."), user("Hi")], template)
    assert got == "SYSTEM:Be brief. [Round 0] USER:Hi ASSISTANT:"


@BOTH_RENDERERS
def test_multi_turn_counts_user_rounds_and_closes_answers_with_eos(template):
    messages = [system("S"), user("q0"), assistant("a0"), user("q1"), assistant("a1"), user("q2")]
    expected = (
        "SYSTEM:S [Round 0] USER:q0 ASSISTANT:a0</longcat_s> [Round 1] USER:q1 ASSISTANT:a1</longcat_s>"
        " [Round 2] USER:q2 ASSISTANT:"
    )
    assert render_chat_template(messages, template) == expected


@BOTH_RENDERERS
def test_without_generation_prompt(template):
    got = render_chat_template([user("q0"), assistant("a0")], template, add_generation_prompt=False)
    assert got == "[Round 0] USER:q0 ASSISTANT:a0</longcat_s>"


@BOTH_RENDERERS
def test_non_ascii_and_template_syntax_in_content_pass_through(template):
    text = "猫 🐱 {{ not_jinja }} {% raw %}"
    assert render_chat_template([user(text)], template) == f"[Round 0] USER:{text} ASSISTANT:"


def test_checkpoint_template_replaces_default_and_sees_special_tokens():
    template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    got = render_chat_template(
        [system("S"), user("hi")], template, special_tokens={"bos_token": "<s>", "eos_token": "</s>"}
    )
    # trim_blocks (as in transformers) drops the newline right after each block tag
    assert got == "<s><|system|>\nS</s>\n<|user|>\nhi</s>\n<|assistant|>\n"


def test_checkpoint_template_gets_extra_kwargs_and_tojson_keeps_non_ascii():
    template = "{{ messages[0]['content'] | tojson }}|{{ tools | length }}"
    assert render_chat_template([user("é<>")], template, tools=[1, 2]) == '"é<>"|2'


def test_template_raise_exception_is_a_chat_template_error_on_messages():
    template = "{% if messages|length > 1 %}{{ raise_exception('only one message supported') }}{% endif %}ok"
    assert render_chat_template([user("a")], template) == "ok"
    with pytest.raises(ChatTemplateError, match="only one message supported") as err:
        render_chat_template([user("a"), assistant("b")], template)
    assert err.value.field == "messages"


def test_invalid_jinja_syntax_names_chat_template():
    with pytest.raises(ChatTemplateError) as err:
        render_chat_template([user("a")], "{% for m in messages %}")
    assert err.value.field == "chat_template"


def test_template_is_sandboxed():
    with pytest.raises(ChatTemplateError, match="unsafe") as err:
        render_chat_template([user("a")], "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    assert err.value.field == "chat_template"


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([user("a"), {"role": "tool", "content": "x"}], "messages[1].role"),
        ([{"content": "x"}], "messages[0].role"),
        ([user("a"), assistant("b"), system("late")], "messages[2].role"),
        ([user(None)], "messages[0].content"),
        ([user("a"), {"role": "assistant", "content": ["list"]}], "messages[1].content"),
        ([user("a"), "not a dict"], "messages[1]"),
        ([], "messages"),
        ("just a string", "messages"),
        (None, "messages"),
    ],
)
@BOTH_RENDERERS
def test_bad_messages_name_the_field(template, messages, field):
    with pytest.raises(ChatTemplateError) as err:
        render_chat_template(messages, template)
    assert err.value.field == field
    assert isinstance(err.value, ValueError)
    assert str(err.value).startswith(field + ":")
