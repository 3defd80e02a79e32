"""A remote agent in a few lines: it answers with the user's words, upper-cased.

    python examples/echo_agent.py        # serves agentsessions.v1.AgentService on 127.0.0.1:7000

Then point an agent at it (in the `sessiond serve --config` file, or with CreateAgent):

    [[agents]]
    id = "shout"
    [agents.remote]
    target = "127.0.0.1:7000"
"""

from agentsessions.agent import run_agent, text_of


async def shout(request):
    for word in text_of(request.message).split():
        yield word.upper() + " "


if __name__ == "__main__":
    run_agent(shout, port=7000)
