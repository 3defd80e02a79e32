"""Session stores for agent frameworks, kept by Agent Sessions. Each is an extra of the distribution:

- :mod:`agentsessions.integrations.openai_agents` (``pip install 'agentsessions[openai-agents]'``): an
  OpenAI Agents SDK ``Session``, for ``Runner.run(..., session=...)``.
- :mod:`agentsessions.integrations.adk` (``pip install 'agentsessions[adk]'``): a Google ADK
  ``BaseSessionService``, for ``Runner(session_service=...)``.

Both store each framework item or event as one message: readable parts (text, tool calls and results)
for every other reader, and the framework's own JSON, verbatim, in a hidden data part, so a round trip
through the service loses nothing. Tool calls and results are linked by call id, so a limit on the
history never returns a result without its call.
"""
