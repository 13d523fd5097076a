// Command example walks the README's flow against a running Nexus Data Service, from Go:
//
//  1. create a user, a project (twice with one request_id: the same project) and five tasks
//  2. list the project's tasks two by two, following next_page_token to the end
//  3. update a task with the etag it was read with, then again with that (now stale) etag:
//     ABORTED, whose google.rpc.Status details (ErrorInfo reason ETAG_MISMATCH, ...) it prints;
//     and a Get of an id that is no UUID: INVALID_ARGUMENT with a BadRequest naming the field
//  4. follow a channel with StreamEvents, read three messages' events, disconnect, post two
//     more, reconnect with the last event's resume_token and get exactly the two it missed
//
// Environment: NEXUS_API_KEY (an admin key: required), NEXUS_ADDRESS (default localhost:50051).
// It exits 1 on any unexpected answer.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	chatv1 "github.com/nexus/data-service/gen/go/nexus/chat/v1"
	commonv1 "github.com/nexus/data-service/gen/go/nexus/common/v1"
	identityv1 "github.com/nexus/data-service/gen/go/nexus/identity/v1"
	workv1 "github.com/nexus/data-service/gen/go/nexus/work/v1"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/fieldmaskpb"
)

const callTimeout = 15 * time.Second

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "go example FAILED:", err)
		os.Exit(1)
	}
	fmt.Println("go example: every step answered as expected")
}

type clients struct {
	identity identityv1.IdentityServiceClient
	work     workv1.WorkServiceClient
	chat     chatv1.ChatServiceClient
	auth     string // "Bearer <key>"
}

// ctx is a call's context: its deadline and the API key in the `authorization` metadata.
func (c *clients) ctx() (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	return metadata.AppendToOutgoingContext(ctx, "authorization", c.auth), cancel
}

func run() error {
	address := os.Getenv("NEXUS_ADDRESS")
	if address == "" {
		address = "localhost:50051"
	}
	key := os.Getenv("NEXUS_API_KEY")
	if key == "" {
		return errors.New("set NEXUS_API_KEY to an admin API key")
	}
	dialCtx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	conn, err := grpc.DialContext(dialCtx, address, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		return fmt.Errorf("connect to %s: %w", address, err)
	}
	defer conn.Close()
	c := &clients{
		identity: identityv1.NewIdentityServiceClient(conn),
		work:     workv1.NewWorkServiceClient(conn),
		chat:     chatv1.NewChatServiceClient(conn),
		auth:     "Bearer " + key,
	}
	suffix := randomHex(4)

	project, tasks, err := create(c, suffix)
	if err != nil {
		return err
	}
	if err := listPages(c, project, tasks); err != nil {
		return err
	}
	if err := updateWithEtag(c, tasks[0]); err != nil {
		return err
	}
	if err := badInput(c); err != nil {
		return err
	}
	return streamWithResume(c, suffix)
}

// create makes a user, a project it owns and five tasks in it.
func create(c *clients, suffix string) (*workv1.Project, []*workv1.Task, error) {
	ctx, cancel := c.ctx()
	defer cancel()
	user, err := c.identity.CreateUser(ctx, &identityv1.CreateUserRequest{
		User: &identityv1.User{
			Username: "go-" + suffix, Email: "go-" + suffix + "@example.com",
			FullName: "Go Example", Password: "correct horse battery",
		},
		RequestId: newUUID(),
	})
	if err != nil {
		return nil, nil, fmt.Errorf("CreateUser: %w", err)
	}
	fmt.Printf("created user %s (%s)\n", user.Id, user.Username)

	request := &workv1.CreateProjectRequest{
		Project: &workv1.Project{
			Name: "Apollo " + suffix, OwnerId: user.Id,
			Budget:    &commonv1.Money{CurrencyCode: "EUR", Units: 12000},
			StartDate: &commonv1.Date{Year: 2026, Month: 1, Day: 5},
		},
		RequestId: newUUID(), // sent again after a lost answer, it returns the first result
	}
	project, err := c.work.CreateProject(ctx, request)
	if err != nil {
		return nil, nil, fmt.Errorf("CreateProject: %w", err)
	}
	again, err := c.work.CreateProject(ctx, request)
	if err != nil {
		return nil, nil, fmt.Errorf("CreateProject (repeated request_id): %w", err)
	}
	if again.Id != project.Id {
		return nil, nil, fmt.Errorf("a repeated request_id made a second project: %s and %s", project.Id, again.Id)
	}
	fmt.Printf("created project %s (%s); its request_id sent again returned it, not a second one\n", project.Id, project.Name)

	var tasks []*workv1.Task
	for i := 1; i <= 5; i++ {
		task, err := c.work.CreateTask(ctx, &workv1.CreateTaskRequest{
			Task: &workv1.Task{
				ProjectId: project.Id, Title: fmt.Sprintf("Launch step %d", i),
				Tags: []string{"launch"}, EstimatedHours: float64(i),
			},
			RequestId: newUUID(),
		})
		if err != nil {
			return nil, nil, fmt.Errorf("CreateTask %d: %w", i, err)
		}
		tasks = append(tasks, task)
	}
	fmt.Printf("created %d tasks\n", len(tasks))
	return project, tasks, nil
}

// listPages reads the project's tasks two per page until next_page_token is empty.
func listPages(c *clients, project *workv1.Project, tasks []*workv1.Task) error {
	ctx, cancel := c.ctx()
	defer cancel()
	var seen []string
	pages := 0
	token := ""
	for {
		page, err := c.work.ListTasks(ctx, &workv1.ListTasksRequest{
			Filter: fmt.Sprintf("project_id = %q", project.Id), OrderBy: "create_time",
			PageSize: 2, PageToken: token,
		})
		if err != nil {
			return fmt.Errorf("ListTasks page %d: %w", pages+1, err)
		}
		pages++
		if page.TotalSize != int32(len(tasks)) {
			return fmt.Errorf("ListTasks page %d: total_size %d, want %d", pages, page.TotalSize, len(tasks))
		}
		for _, t := range page.Tasks {
			seen = append(seen, t.Id)
		}
		fmt.Printf("page %d: %d tasks\n", pages, len(page.Tasks))
		token = page.NextPageToken
		if token == "" {
			break
		}
		if pages > len(tasks) {
			return errors.New("ListTasks: more pages than tasks")
		}
	}
	var want []string
	for _, t := range tasks {
		want = append(want, t.Id)
	}
	sort.Strings(want)
	sort.Strings(seen)
	if pages != 3 || strings.Join(seen, ",") != strings.Join(want, ",") {
		return fmt.Errorf("ListTasks: %d pages with %v, want 3 pages with %v", pages, seen, want)
	}
	fmt.Printf("listed all %d tasks in %d pages\n", len(seen), pages)
	return nil
}

// updateWithEtag updates a task with the etag it was read with, then with that stale etag.
func updateWithEtag(c *clients, task *workv1.Task) error {
	ctx, cancel := c.ctx()
	defer cancel()
	done, err := c.work.UpdateTask(ctx, &workv1.UpdateTaskRequest{
		Task:       &workv1.Task{Id: task.Id, Status: workv1.TaskStatus_TASK_STATUS_DONE, Etag: task.Etag},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"status"}},
	})
	if err != nil {
		return fmt.Errorf("UpdateTask with the current etag: %w", err)
	}
	if done.Status != workv1.TaskStatus_TASK_STATUS_DONE || done.CompletedTime == nil || done.Etag == task.Etag {
		return fmt.Errorf("UpdateTask: status %v, completed_time %v, etag %s (was %s)", done.Status, done.CompletedTime, done.Etag, task.Etag)
	}
	fmt.Printf("updated task %s to DONE: etag %s -> %s\n", task.Id, task.Etag, done.Etag)

	_, err = c.work.UpdateTask(ctx, &workv1.UpdateTaskRequest{
		Task:       &workv1.Task{Id: task.Id, Title: "a lost update", Etag: task.Etag},
		UpdateMask: &fieldmaskpb.FieldMask{Paths: []string{"title"}},
	})
	info, err := expectError(err, "UpdateTask with a stale etag", codes.Aborted)
	if err != nil {
		return err
	}
	if info.Reason != "ETAG_MISMATCH" || info.Metadata["current_etag"] != done.Etag {
		return fmt.Errorf("stale etag: ErrorInfo %v, want reason ETAG_MISMATCH and current_etag %s", info, done.Etag)
	}
	return nil
}

// badInput gets a task by an id that is no UUID: INVALID_ARGUMENT, a BadRequest naming `id`.
func badInput(c *clients) error {
	ctx, cancel := c.ctx()
	defer cancel()
	_, err := c.work.GetTask(ctx, &workv1.GetTaskRequest{Id: "nope"})
	info, err := expectError(err, "GetTask of a bad id", codes.InvalidArgument)
	if err != nil {
		return err
	}
	if info.Reason != "INVALID_FIELD" || info.Metadata["field"] != "id" {
		return fmt.Errorf("bad id: ErrorInfo %v, want reason INVALID_FIELD naming field id", info)
	}
	return nil
}

// expectError checks that err has the code `want` and a google.rpc.Status with exactly one
// ErrorInfo (domain "nexus"), prints its details and returns the ErrorInfo.
//
// The server sends the Status serialized in the `grpc-status-details-bin` trailer; grpc-go
// decodes it (and keeps the trailer out of the metadata it hands over): status.Convert(err).Proto()
// is that Status, and Details() unpacks each Any to its message (errdetails is imported, so its
// types are registered; an Any of a type not linked in comes back as an error).
func expectError(err error, what string, want codes.Code) (*errdetails.ErrorInfo, error) {
	if err == nil {
		return nil, fmt.Errorf("%s: succeeded, want %s", what, want)
	}
	st := status.Convert(err)
	if st.Code() != want {
		return nil, fmt.Errorf("%s: %s (%s), want %s", what, st.Code(), st.Message(), want)
	}
	if st.Proto().Code != int32(want) || len(st.Proto().Details) == 0 {
		return nil, fmt.Errorf("%s: no google.rpc.Status details in the grpc-status-details-bin trailer", what)
	}
	fmt.Printf("%s: %s: %s\n", what, st.Code(), st.Message())
	var infos []*errdetails.ErrorInfo
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			infos = append(infos, d)
			fmt.Printf("  ErrorInfo reason=%s domain=%s metadata=%v\n", d.Reason, d.Domain, d.Metadata)
		case *errdetails.BadRequest:
			for _, v := range d.FieldViolations {
				fmt.Printf("  BadRequest field=%s: %s\n", v.Field, v.Description)
			}
		case *errdetails.ResourceInfo:
			fmt.Printf("  ResourceInfo %s %s\n", d.ResourceType, d.ResourceName)
		case error: // an Any of a type this program does not link in
			return nil, fmt.Errorf("%s: undecodable detail: %w", what, d)
		default:
			fmt.Printf("  %T %v\n", d, d)
		}
	}
	if len(infos) != 1 || infos[0].Domain != "nexus" {
		return nil, fmt.Errorf("%s: ErrorInfo details %v, want exactly one of domain nexus", what, infos)
	}
	return infos[0], nil
}

// streamWithResume follows a new channel, reads three events, disconnects, misses two
// messages and resumes with the last resume_token: exactly the two missed events arrive.
func streamWithResume(c *clients, suffix string) error {
	ctx, cancel := c.ctx()
	defer cancel()
	channel, err := c.chat.CreateChannel(ctx, &chatv1.CreateChannelRequest{
		Channel: &chatv1.Channel{Name: "go-example-" + suffix}, RequestId: newUUID(),
	})
	if err != nil {
		return fmt.Errorf("CreateChannel: %w", err)
	}
	// A heartbeat every second; the first one says the stream is subscribed, so every message
	// posted after it reaches this stream.
	first, err := c.chat.StreamEvents(ctx, &chatv1.StreamEventsRequest{ChannelIds: []string{channel.Id}, HeartbeatSeconds: 1})
	if err != nil {
		return fmt.Errorf("StreamEvents: %w", err)
	}
	beat, err := first.Recv()
	if err != nil {
		return fmt.Errorf("StreamEvents: first heartbeat: %w", err)
	}
	if beat.Type != chatv1.EventType_EVENT_TYPE_HEARTBEAT {
		return fmt.Errorf("StreamEvents: first event %v, want a heartbeat", beat.Type)
	}
	for _, text := range []string{"a1", "a2", "a3"} {
		if err := post(ctx, c, channel.Id, text); err != nil {
			return err
		}
	}
	got, err := readEvents(first, 3)
	if err != nil {
		return err
	}
	if err := expectMessages(got, channel.Id, "a1", "a2", "a3"); err != nil {
		return err
	}
	last := got[len(got)-1]
	fmt.Printf("stream: read %d events (sequence %d..%d), disconnecting\n", len(got), got[0].Sequence, last.Sequence)

	// Disconnect: a new context for the resumed stream, and this one cancelled.
	streamCtx, cancelStream := c.ctx()
	cancel()
	defer cancelStream()
	for _, text := range []string{"b1", "b2"} {
		if err := post(streamCtx, c, channel.Id, text); err != nil {
			return err
		}
	}
	resumed, err := c.chat.StreamEvents(streamCtx, &chatv1.StreamEventsRequest{ResumeToken: last.ResumeToken, HeartbeatSeconds: 1})
	if err != nil {
		return fmt.Errorf("StreamEvents with resume_token: %w", err)
	}
	missed, err := readEvents(resumed, 2)
	if err != nil {
		return err
	}
	if err := expectMessages(missed, channel.Id, "b1", "b2"); err != nil {
		return err
	}
	if missed[0].Sequence != last.Sequence+1 {
		return fmt.Errorf("resumed at sequence %d, want %d", missed[0].Sequence, last.Sequence+1)
	}
	fmt.Printf("stream: resumed after sequence %d and got exactly the %d missed events\n", last.Sequence, len(missed))
	return nil
}

// post creates a message in a channel.
func post(ctx context.Context, c *clients, channelID, text string) error {
	_, err := c.chat.CreateChatMessage(ctx, &chatv1.CreateChatMessageRequest{
		ChatMessage: &chatv1.ChatMessage{ChannelId: channelID, Content: text}, RequestId: newUUID(),
	})
	if err != nil {
		return fmt.Errorf("CreateChatMessage %q: %w", text, err)
	}
	return nil
}

// readEvents reads n events of a stream, heartbeats skipped.
func readEvents(stream chatv1.ChatService_StreamEventsClient, n int) ([]*chatv1.StreamEventsResponse, error) {
	var out []*chatv1.StreamEventsResponse
	for len(out) < n {
		event, err := stream.Recv()
		if err == io.EOF {
			return nil, fmt.Errorf("StreamEvents ended after %d of %d events", len(out), n)
		}
		if err != nil {
			return nil, fmt.Errorf("StreamEvents after %d of %d events: %w", len(out), n, err)
		}
		if event.Type != chatv1.EventType_EVENT_TYPE_HEARTBEAT {
			out = append(out, event)
		}
	}
	return out, nil
}

// expectMessages checks that events are the creations of messages `texts` in channel, in order.
func expectMessages(events []*chatv1.StreamEventsResponse, channelID string, texts ...string) error {
	for i, event := range events {
		msg := event.GetChatMessage()
		if event.Type != chatv1.EventType_EVENT_TYPE_CREATED || msg == nil || msg.Content != texts[i] ||
			event.Scope != "channels/"+channelID || event.ResumeToken == "" ||
			(i > 0 && event.Sequence != events[i-1].Sequence+1) {
			return fmt.Errorf("event %d: %v %q in %s at %d, want the creation of %q", i, event.Type, msg.GetContent(), event.Scope, event.Sequence, texts[i])
		}
	}
	return nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

// newUUID is a random (version 4) UUID: a request_id.
func newUUID() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}
