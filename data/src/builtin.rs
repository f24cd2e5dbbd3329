//! The chat templates ferrotune ships for tokenizers that ship none: `llama3` (Meta-Llama-3-8B-Instruct's
//! own), `llama31` (Llama 3.1's tool-calling layout: tool definitions in the first user turn, calls as
//! JSON, results under the `ipython` role) and `chatml`. Names match in any case. Templates only; they are
//! compiled and rendered by `template`.

/// The Llama 3 Instruct template (as shipped in Meta-Llama-3-8B-Instruct's tokenizer_config.json).
pub const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// ChatML (`<|im_start|>role\ncontent<|im_end|>\n`), without an injected system prompt.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Llama 3.1's tool-calling layout, after Meta-Llama-3.1-8B-Instruct's template, with three changes
/// so that OpenAI-shaped data renders as the model expects: parallel calls are allowed (one JSON object
/// per line), `arguments` given as JSON text is written as it is (not quoted again), and a tool result
/// that is a string is written as it is. The date is fixed (Meta's default), so a prepared cache does
/// not depend on the day it was built.
pub const LLAMA31: &str = r#"{{- bos_token }}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 and messages[0]['role'] == 'user' %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Llama 3.1 puts the tool definitions in the first user message, and this conversation has no user message after the system message") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == 'assistant' and message.tool_calls is defined and message.tool_calls %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {%- if message.content is string and message.content | trim %}
            {{- message.content | trim + "\n" }}
        {%- endif %}
        {%- for call in message.tool_calls %}
            {%- set f = call.function if call.function is defined else call %}
            {{- '{"name": "' + f.name + '", "parameters": ' }}
            {%- if f.arguments is string %}
                {{- f.arguments }}
            {%- else %}
                {{- f.arguments | tojson }}
            {%- endif %}
            {{- "}" }}
            {%- if not loop.last %}
                {{- "\n" }}
            {%- endif %}
        {%- endfor %}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {{- message.content | tojson }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

/// The built-in template called `name` (any case): its canonical name and source.
pub fn get(name: &str) -> Option<(&'static str, &'static str)> {
    [("llama3", LLAMA3), ("llama31", LLAMA31), ("chatml", CHATML)]
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
}
